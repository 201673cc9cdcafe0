"""The built-in model families. Adding a family is one ``register_adapter`` call here."""

from __future__ import annotations

from .base import ArchitectureAdapter
from .registry import register_adapter

# BERT and RoBERTa share one layout: encoder.layer[i].attention.{self,output}.
register_adapter(
    ArchitectureAdapter(
        model_types=("bert", "roberta"),
        layers="encoder.layer",
        attention="attention.self",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        output="attention.output.dense",
        ffn=("intermediate.dense", "output.dense"),
        num_heads_attrs=("num_attention_heads",),
        width_attrs=("all_head_size",),
    )
)

register_adapter(
    ArchitectureAdapter(
        model_types=("distilbert",),
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        ffn=("ffn.lin1", "ffn.lin2"),
        num_heads_attrs=("n_heads",),
        num_heads_key="n_heads",
    )
)

# GPT-2 fuses q, k and v in one Conv1D whose output is split in three equal parts.
register_adapter(
    ArchitectureAdapter(
        model_types=("gpt2",),
        layers="h",
        attention="attn",
        qkv="attn.c_attn",
        output="attn.c_proj",
        ffn=("mlp.c_fc", "mlp.c_proj"),
        num_heads_attrs=("num_heads",),
        width_attrs=("split_size",),
    )
)

# Grouped-query decoders: heads leave by whole key/value groups, so num_key_value_groups stays.
register_adapter(
    ArchitectureAdapter(
        model_types=("llama", "mistral", "qwen2"),
        layers="layers",
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        output="self_attn.o_proj",
        ffn=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    )
)
