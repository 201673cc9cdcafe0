import pytest
import torch

from hf_gradprune import HeadGates, add_head_gates, get_adapter, prune_heads

from .helpers import build_tiny, logits, tiny_batch


def heads_for(model_type: str) -> dict[int, list[int]]:
    """Heads to remove in the tiny models: whole kv groups (of 2) for grouped-query families."""
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    if adapter.group_size(adapter.structure("heads"), model.config) > 1:
        return {0: [2, 3], 2: [0, 1]}
    return {0: [1], 2: [0, 3]}


def gated(model, heads: dict[int, list[int]], batch: dict) -> torch.Tensor:
    adapter = get_adapter(model)
    gates = torch.ones(len(adapter.blocks(model)), adapter.num_units("heads", model.config))
    for layer, hs in heads.items():
        gates[layer, hs] = 0.0
    with HeadGates(model, gates):
        return logits(model, batch)


def test_head_gates_zero_equals_structural_pruning(model_type):
    model, heads = build_tiny(model_type), heads_for(model_type)
    batch = tiny_batch(model)
    expected = gated(model, heads, batch)
    prune_heads(model, heads)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_head_gates_zero_changes_output(model_type):
    model = build_tiny(model_type)
    batch = tiny_batch(model)
    assert not torch.allclose(gated(model, heads_for(model_type), batch), logits(model, batch), atol=1e-4)


def test_head_gates_ones_leave_model_unchanged(model_type):
    model = build_tiny(model_type)
    batch = tiny_batch(model)
    with add_head_gates(model):
        out = logits(model, batch)
    torch.testing.assert_close(out, logits(model, batch), atol=0, rtol=0)


def test_head_gates_remove_leaves_no_hooks(model_type):
    model = build_tiny(model_type)
    before = logits(model, tiny_batch(model))
    gates = add_head_gates(model, torch.zeros(3, 4))
    gates.remove()
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(logits(model, tiny_batch(model)), before, atol=0, rtol=0)


def test_head_gates_on_pruned_model_use_original_indices():
    model = build_tiny("bert")
    batch = tiny_batch(model)
    prune_heads(model, {0: [1]})
    expected = gated(model, {0: [1, 2]}, batch)  # gate of head 1 is ignored: already removed
    prune_heads(model, {0: [2]})
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_head_gates_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"`gates` must have shape \(3, 4\) for 'heads', got \(2, 4\)"):
        HeadGates(build_tiny("bert"), torch.ones(2, 4))


def test_head_gates_bf16_model_keeps_dtype():
    model = build_tiny("llama").to(torch.bfloat16)
    with HeadGates(model, requires_grad=True) as gates:
        loss = model(**tiny_batch(model)).loss
        loss.backward()
    assert gates.gates.grad is not None and gates.gates.grad.dtype == torch.float32
