"""The foundation on the real all-MiniLM-L6-v2 encoder (6 layers x 12 heads) and real reviews."""

import copy

import pytest
import torch
from transformers import BertForSequenceClassification

from hf_gradprune import (
    HeadGates,
    LayerGates,
    compute_head_importance,
    load_pruned,
    prune_heads,
    prune_layers_by_importance,
    select_heads_to_prune,
)

from .helpers import fresh_reload_logits, load_minilm, logits

pytestmark = pytest.mark.real


def seed_formula(model, batches: list[dict]) -> torch.Tensor:
    """The classic recipe, computed independently: a mask multiplies each head's context vector
    (forward hooks on the self-attention modules), the loss's gradient w.r.t. the mask is summed
    over batches, then |.| divided by its per-layer sum."""
    mask = torch.ones(6, 12, requires_grad=True)
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):

        def hook(_module, _args, output, i=i):
            context, weights = output
            heads = context.view(*context.shape[:-1], 12, 32) * mask[i][:, None]
            return heads.view(context.shape), weights

        handles.append(layer.attention.self.register_forward_hook(hook))
    for batch in batches:
        model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    grad = mask.grad.abs()
    return grad / grad.sum(dim=-1, keepdim=True)


def test_minilm_head_importance_equals_seed_formula(review_batches):
    batches = review_batches(3, 8)
    ours = compute_head_importance(load_minilm(), batches, accumulate="abs_of_sum", show_progress=False)
    torch.testing.assert_close(ours, seed_formula(load_minilm(), batches), atol=1e-6, rtol=1e-4)


def test_minilm_gated_to_zero_equals_pruned(review_batches):
    model, batch = load_minilm(), review_batches(1, 8)[0]
    heads = {0: [0, 5], 3: [11], 5: list(range(1, 12, 2))}
    gates = torch.ones(6, 12)
    for layer, hs in heads.items():
        gates[layer, hs] = 0.0
    with HeadGates(model, gates):
        expected = logits(model, batch)
    prune_heads(model, heads)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_minilm_pruning_twice_composes(review_batches):
    batch = review_batches(1, 8)[0]
    once, twice = load_minilm(), load_minilm()
    prune_heads(once, {2: [1, 4, 7], 4: [0]})
    prune_heads(twice, {2: [4]})
    prune_heads(twice, {2: [1, 7], 4: [0]})
    torch.testing.assert_close(logits(twice, batch), logits(once, batch), atol=1e-5, rtol=0)


def test_minilm_prune_one_head_per_layer_reloads_in_fresh_process(review_batches, tmp_path):
    model, batches = load_minilm(), review_batches(2, 8)
    importance = compute_head_importance(model, batches, show_progress=False)
    prune_heads(model, select_heads_to_prune(importance, per_layer=1))
    assert [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer] == [11] * 6
    model.save_pretrained(tmp_path / "pruned")
    reloaded = fresh_reload_logits(tmp_path / "pruned", batches[0], tmp_path)
    torch.testing.assert_close(reloaded, logits(model, batches[0]), atol=0, rtol=0)
    assert load_pruned(tmp_path / "pruned").num_parameters() == model.num_parameters()


def test_minilm_two_layers_removed_by_fisher_equal_their_gates_at_zero_and_load_with_plain_transformers(
    review_batches, tmp_path
):
    model, batches = load_minilm(), review_batches(2, 8)
    gated = copy.deepcopy(model)
    report = prune_layers_by_importance(model, batches, 2, show_progress=False)
    gates = torch.ones(6)
    gates[report["layers"]] = 0.0
    with LayerGates(gated, gates):
        expected = logits(gated, batches[0])
    torch.testing.assert_close(logits(model, batches[0]), expected, atol=1e-5, rtol=1e-5)
    assert len(model.bert.encoder.layer) == 4 and model.config.num_hidden_layers == 4
    model.save_pretrained(tmp_path / "pruned")
    plain = BertForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(logits(plain, batches[0]), logits(model, batches[0]), atol=0, rtol=0)
