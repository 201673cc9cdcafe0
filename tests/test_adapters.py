import dataclasses

import pytest
from transformers import OPTConfig, OPTForCausalLM

from hf_gradprune import get_adapter, register_adapter, supported_model_types
from hf_gradprune.core.adapters import ArchitectureAdapter, weight_dims

from .helpers import build_tiny


def test_registry_covers_required_families():
    assert {"bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2"} <= set(
        supported_model_types()
    )


def test_adapter_structures_match_layer_shapes(model_type):
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    config = model.config
    assert [s.name for s in adapter.structures] == ["heads", "ffn"]
    for structure in adapter.structures:
        units = adapter.num_units(structure, config)
        width = adapter.unit_width(structure, config)
        runs = {"unit": units * width, "group": units // adapter.group_size(structure, config) * width}
        for layer in range(len(adapter.blocks(model))):
            for rows in structure.rows:
                module = adapter.module(model, layer, rows.path)
                assert module.weight.shape[weight_dims(module)[0]] == sum(runs[s] for s in rows.segments)
            output = adapter.module(model, layer, structure.output)
            assert output.weight.shape[weight_dims(output)[1]] == units * width


def test_adapter_unsupported_model_lists_supported_families():
    model = OPTForCausalLM(
        OPTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=16,
            num_attention_heads=2,
            vocab_size=50,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(
        ValueError, match=r"model_type 'opt'.*Supported model types: bert, distilbert, gpt2.*register_adapter"
    ):
        get_adapter(model)


def test_register_adapter_refuses_duplicates():
    with pytest.raises(ValueError, match=r"already registered.*bert"):
        register_adapter(ArchitectureAdapter(model_types=("bert",), layers="x", structures=()))


def test_adapter_gqa_head_counts_on_tiny_llama():
    config = build_tiny("llama").config
    adapter = get_adapter(config)
    heads = adapter.structure("heads")
    assert adapter.num_units(heads, config) == 4
    assert (adapter.group_size(heads, config), adapter.unit_width(heads, config)) == (2, 8)


def test_structure_declares_width_groups_and_context_cost():
    """A structure's unit width, grouping and per-token cost come from its declaration, not its name."""
    config = build_tiny("llama").config
    adapter = get_adapter(config)
    declared = dataclasses.replace(adapter.structure("ffn"), width="head_dim")
    assert (adapter.unit_width(declared, config), adapter.group_size(declared, config)) == (8, 1)
    plain = dataclasses.replace(adapter.structure("heads"), width=None, groups=None)
    assert (adapter.unit_width(plain, config), adapter.group_size(plain, config)) == (1, 1)
