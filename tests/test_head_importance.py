import math

import pytest
import torch

from hf_gradprune import compute_head_importance, prune_heads

from .helpers import build_tiny, tiny_batch


def batches(model, n: int = 3) -> list[dict]:
    return [tiny_batch(model, seed=i) for i in range(n)]


def test_head_importance_shape_and_layer_sum(model_type):
    model = build_tiny(model_type)
    scores = compute_head_importance(model, batches(model), show_progress=False)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(3))


def test_head_importance_l2_rows_have_unit_norm():
    model = build_tiny("bert")
    scores = compute_head_importance(model, batches(model), normalize="l2", show_progress=False)
    torch.testing.assert_close(scores.norm(dim=-1), torch.ones(3))


def test_head_importance_normalizations_are_rescalings_of_raw():
    model = build_tiny("gpt2")
    raw = compute_head_importance(model, batches(model), normalize="none", show_progress=False)
    layer_sum = compute_head_importance(model, batches(model), show_progress=False)
    torch.testing.assert_close(layer_sum, raw / raw.sum(dim=-1, keepdim=True))


def test_head_importance_sum_of_abs_bounds_abs_of_sum():
    model = build_tiny("bert")
    kwargs = {"normalize": "none", "show_progress": False}
    abs_of_sum = compute_head_importance(model, batches(model, 4), accumulate="abs_of_sum", **kwargs)
    sum_of_abs = compute_head_importance(model, batches(model, 4), accumulate="sum_of_abs", **kwargs)
    assert (sum_of_abs >= abs_of_sum - 1e-7).all() and (sum_of_abs > abs_of_sum + 1e-7).any()


def test_head_importance_num_batches_limits_the_pass():
    model = build_tiny("bert")
    kwargs = {"normalize": "none", "show_progress": False}
    first = compute_head_importance(model, batches(model, 1), **kwargs)
    torch.testing.assert_close(
        compute_head_importance(model, batches(model, 3), num_batches=1, **kwargs), first
    )


def test_head_importance_leaves_model_state_untouched():
    model = build_tiny("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)
    grads = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_head_importance(model, batches(model), show_progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=0, rtol=0)


def test_head_importance_removed_heads_are_nan():
    model = build_tiny("bert")
    prune_heads(model, {1: [0, 2]})
    scores = compute_head_importance(model, batches(model), show_progress=False)
    assert math.isnan(scores[1, 0]) and math.isnan(scores[1, 2])
    assert not scores[0].isnan().any()
    torch.testing.assert_close(scores[1, [1, 3]].sum(), torch.tensor(1.0))


def test_head_importance_without_labels_is_a_clear_error():
    model = build_tiny("bert")
    batch = {k: v for k, v in tiny_batch(model).items() if k != "labels"}
    with pytest.raises(ValueError, match=r"returned no loss.*labels"):
        compute_head_importance(model, [batch], show_progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalize": "max"}, "`normalize` must be one of 'layer_sum', 'l2', 'none', got 'max'"),
        (
            {"accumulate": "mean"},
            "`accumulate` must be one of 'fisher', 'sum_of_abs', 'abs_of_sum', got 'mean'",
        ),
        ({"num_batches": 0}, "`num_batches` must be a positive integer"),
    ],
)
def test_head_importance_bad_arguments_are_clear_errors(kwargs, match):
    model = build_tiny("bert")
    with pytest.raises(ValueError, match=match):
        compute_head_importance(model, batches(model), show_progress=False, **kwargs)


def test_head_importance_empty_dataloader_is_a_clear_error():
    with pytest.raises(ValueError, match="yielded no batches"):
        compute_head_importance(build_tiny("bert"), [], show_progress=False)
