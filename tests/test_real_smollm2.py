"""Grouped-query pruning and block-by-block weight pruning on the real SmolLM2-135M-Instruct (Llama, 9 query /
3 key-value heads, GGUF)."""

import copy

import pytest
import torch

from hf_gradprune import (
    compute_head_importance,
    export_vanilla,
    prune_heads,
    prune_layers_by_importance,
    prune_weights,
    select_heads_to_prune,
)
from hf_gradprune.testing import load_rotten_tomatoes

from .helpers import fresh_reload_logits, logits
from .test_export import plain_logits

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


def test_smollm2_block_by_block_2_4_sparsegpt_and_reconstruction_beat_plain_wanda(smollm2):
    """The first two blocks of the real model at 2:4: SparseGPT and Wanda with least squares restore the
    outputs on the calibration text better than Wanda alone (held-out text:
    ``benchmarks/llm_blockwise.py``)."""
    model, tokenizer = smollm2
    texts = load_rotten_tomatoes()["train"]["text"][:8]
    batches = [tokenizer(texts, truncation=True, max_length=32, padding="max_length", return_tensors="pt")]
    dense = [logits(model, batch) for batch in batches]
    targets = [r"model\.layers\.[01]\."]
    errors = {}
    for method, reconstruction in (("wanda", "none"), ("sparsegpt", "none"), ("wanda", "least_squares")):
        pruned = copy.deepcopy(model)
        masks = prune_weights(
            pruned,
            batches,
            None,
            method=method,
            pattern="2:4",
            target_modules=targets,
            sequential=True,
            reconstruction=reconstruction,
            show_progress=False,
        )
        assert len(masks) == 2 * 7
        for name, keep in masks.items():
            assert bool((keep.view(keep.shape[0], -1, 4).sum(-1) == 2).all()), name
            assert bool((pruned.get_parameter(name)[~keep] == 0).all()), name
        errors[method, reconstruction] = sum(
            float((logits(pruned, b) - d).square().mean()) for b, d in zip(batches, dense, strict=True)
        )
    assert errors["sparsegpt", "none"] < errors["wanda", "none"]
    assert errors["wanda", "least_squares"] < errors["wanda", "none"]


def test_smollm2_layers_removed_by_block_influence_generate_and_load_with_plain_transformers(
    smollm2, tmp_path
):
    model, tokenizer = smollm2
    texts = load_rotten_tomatoes()["train"]["text"][:8]
    batches = [tokenizer(texts, truncation=True, max_length=32, padding="max_length", return_tensors="pt")]
    report = prune_layers_by_importance(model, batches, 4, "block_influence", show_progress=False)
    assert report["importance"].shape == (30,) and len(report["layers"]) == 4
    assert model.config.num_hidden_layers == 26 and len(model.model.layers) == 26
    prompt = tokenizer(TEXTS[:1], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    batch = {**prompt, "labels": prompt["input_ids"]}
    got, report = plain_logits(export_vanilla(model, tmp_path / "vanilla"), model, batch, tmp_path, True)
    torch.testing.assert_close(got, logits(model, batch), atol=0, rtol=0)
    assert report["config"]["num_hidden_layers"] == 26 and report["generated"] == 5
