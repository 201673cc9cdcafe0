import pytest
from transformers import OPTConfig, OPTForCausalLM

from hf_gradprune import get_adapter, register_adapter, supported_model_types
from hf_gradprune.adapters import ArchitectureAdapter

from .helpers import build_tiny


def test_registry_covers_required_families():
    assert {"bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2"} <= set(
        supported_model_types()
    )


def test_adapter_finds_every_projection(model_type):
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    config = model.config
    width = adapter.num_heads(config) * adapter.head_dim(config)
    kv_width = adapter.num_key_value_heads(config) * adapter.head_dim(config)
    for layer in range(len(adapter.blocks(model))):
        parts = adapter.attention_parts(model, layer)
        if parts.qkv is not None:
            assert parts.qkv.weight.shape[1] == width + 2 * kv_width
        else:
            assert (parts.query.out_features, parts.key.out_features) == (width, kv_width)
        assert len(adapter.ffn_modules(model, layer)) >= 2


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
    with pytest.raises(ValueError, match=r"model_type 'opt'.*Supported model types: bert, distilbert, gpt2"):
        get_adapter(model)


def test_register_adapter_refuses_duplicates():
    with pytest.raises(ValueError, match=r"already registered.*bert"):
        register_adapter(ArchitectureAdapter(model_types=("bert",), layers="x", attention="y", output="z"))


def test_adapter_gqa_head_counts_on_tiny_llama():
    config = build_tiny("llama").config
    adapter = get_adapter(config)
    assert (adapter.num_heads(config), adapter.num_key_value_heads(config), adapter.head_dim(config)) == (
        4,
        2,
        8,
    )
