"""The built-in model families. Adding a family is one ``register_adapter`` call here."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .base import ArchitectureAdapter, attention_heads, ffn_neurons, head_width
from .registry import register_adapter

# BERT and RoBERTa share one layout: encoder.layer[i].attention.{self,output}, intermediate, output.
register_adapter(
    ArchitectureAdapter(
        model_types=("bert", "roberta"),
        layers="encoder.layer",
        structures=(
            attention_heads(
                query="attention.self.query",
                key="attention.self.key",
                value="attention.self.value",
                output="attention.output.dense",
                owner="attention.self",
                count_attrs=("num_attention_heads",),
                width_attrs=("all_head_size",),
            ),
            ffn_neurons(
                rows=("intermediate.dense",),
                output="output.dense",
                residual="intermediate",
                units="intermediate_size",
            ),
        ),
    )
)

register_adapter(
    ArchitectureAdapter(
        model_types=("distilbert",),
        layers="transformer.layer",
        structures=(
            attention_heads(
                query="attention.q_lin",
                key="attention.k_lin",
                value="attention.v_lin",
                output="attention.out_lin",
                owner="attention",
                count_attrs=("n_heads",),
                units="n_heads",
            ),
            ffn_neurons(rows=("ffn.lin1",), output="ffn.lin2", residual="ffn", units="hidden_dim"),
        ),
    )
)

# GPT-2 fuses q, k and v in one Conv1D whose output is split in three equal parts.
register_adapter(
    ArchitectureAdapter(
        model_types=("gpt2",),
        layers="h",
        structures=(
            attention_heads(
                qkv="attn.c_attn",
                output="attn.c_proj",
                owner="attn",
                count_attrs=("num_heads",),
                width_attrs=("split_size",),
                empty="attn",
            ),
            ffn_neurons(
                rows=("mlp.c_fc",),
                output="mlp.c_proj",
                residual="ln_2",
                units=lambda config: config.n_inner or 4 * config.n_embd,
                empty="mlp",
                vanilla=lambda config, kept: {"n_inner": kept},
            ),
        ),
        position_keys=("scale_attn_by_inverse_layer_idx",),
    )
)


def _grouped_heads(config: PretrainedConfig, kept: int) -> dict[str, Any]:
    """``kept`` query heads in every layer, with the key/value groups and the head size they had."""
    group = config.num_attention_heads // config.num_key_value_heads
    return {"num_attention_heads": kept, "num_key_value_heads": kept // group, "head_dim": head_width(config)}


# Grouped-query decoders: heads leave by whole key/value groups, so num_key_value_groups stays.
register_adapter(
    ArchitectureAdapter(
        model_types=("llama", "mistral", "qwen2"),
        layers="layers",
        structures=(
            attention_heads(
                query="self_attn.q_proj",
                key="self_attn.k_proj",
                value="self_attn.v_proj",
                output="self_attn.o_proj",
                empty="self_attn",
                vanilla=_grouped_heads,
            ),
            ffn_neurons(
                rows=("mlp.gate_proj", "mlp.up_proj"),
                output="mlp.down_proj",
                residual="post_attention_layernorm",
                units="intermediate_size",
                owner="mlp",
                count_attrs=("intermediate_size",),
            ),
        ),
    )
)
