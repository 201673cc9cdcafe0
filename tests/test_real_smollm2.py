"""Grouped-query pruning on the real SmolLM2-135M-Instruct (Llama, 9 query / 3 key-value heads, GGUF)."""

import pytest
import torch

from hf_gradprune import compute_head_importance, prune_heads, select_heads_to_prune

from .helpers import fresh_reload_logits, logits

pytestmark = [pytest.mark.real, pytest.mark.slow]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes attention heads that matter least for the loss.",
]


def test_smollm2_prune_kv_groups_reload_fresh_and_generate(smollm2, tmp_path):
    model, tokenizer = smollm2
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch = {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}
    importance = compute_head_importance(model, [batch], show_progress=False)
    assert importance.shape == (30, 9)
    chosen = select_heads_to_prune(importance, per_layer=1, num_key_value_heads=3)
    heads = {layer: chosen[layer] for layer in (0, 7, 29)}
    assert all(
        len(hs) == 3 and hs[0] % 3 == 0 and hs == list(range(hs[0], hs[0] + 3)) for hs in heads.values()
    )
    before = logits(model, batch)
    prune_heads(model, heads)
    attention = model.model.layers[7].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (6 * 64, 2 * 64)
    assert attention.head_dim == 64 and attention.num_key_value_groups == 3
    after = logits(model, batch)
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(
        fresh_reload_logits(tmp_path / "pruned", batch, tmp_path), after, atol=0, rtol=0
    )
    generated = model.generate(
        **encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape[1] == encoded["input_ids"].shape[1] + 5
