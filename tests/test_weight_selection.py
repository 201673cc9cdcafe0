"""Weight masks from scores (per tensor, per layer, global, N:M) and sparsity schedules."""

import time

import pytest
import torch

from hf_gradprune.weights.sparsity import compute_weight_masks, parse_sparsity_pattern, sparsity_at_step


@pytest.fixture
def scores():
    generator = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (8, 12), "b.weight": (5, 16), "c.weight": (7, 4)}
    return {name: torch.rand(shape, generator=generator) for name, shape in shapes.items()}


def pruned_count(mask):
    return int((~mask).sum())


def test_parse_sparsity_pattern_unstructured_is_none():
    assert parse_sparsity_pattern("unstructured") is None


def test_parse_sparsity_pattern_n_m():
    assert parse_sparsity_pattern("2:4") == (2, 4)


@pytest.mark.parametrize("pattern", ["4:2", "0:4", "2:2", "a:b", "2-4", "", "2:4:8"])
def test_parse_sparsity_pattern_rejects_bad_forms(pattern):
    with pytest.raises(ValueError, match=r"`sparsity_pattern` must be 'unstructured' or 'N:M'"):
        parse_sparsity_pattern(pattern)


def test_compute_weight_masks_per_tensor_exact_count(scores):
    masks = compute_weight_masks(scores, 0.3)
    for name, score in scores.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == score.shape
        assert pruned_count(masks[name]) == round(0.3 * score.numel())


def test_compute_weight_masks_per_tensor_prunes_lowest(scores):
    masks = compute_weight_masks(scores, 0.5)
    for name, score in scores.items():
        assert score[~masks[name]].max() <= score[masks[name]].min()


def test_compute_weight_masks_ties_pruned_in_order():
    masks = compute_weight_masks({"w": torch.ones(2, 5)}, 0.3)
    assert masks["w"].flatten().tolist() == [False] * 3 + [True] * 7


def test_compute_weight_masks_nan_ranks_highest():
    masks = compute_weight_masks({"w": torch.tensor([float("nan"), 1.0, 2.0, 3.0])}, 0.75)
    assert masks["w"].tolist() == [True, False, False, False]


def test_compute_weight_masks_zero_sparsity_keeps_all(scores):
    assert all(mask.all() for mask in compute_weight_masks(scores, 0.0).values())


def test_compute_weight_masks_global_exact_count(scores):
    masks = compute_weight_masks(scores, 0.45, scope="global")
    total = sum(score.numel() for score in scores.values())
    assert sum(pruned_count(mask) for mask in masks.values()) == round(0.45 * total)


def test_compute_weight_masks_empty_scores():
    assert compute_weight_masks({}, 0.5, scope="global") == {}


def test_compute_weight_masks_global_one_threshold(scores):
    masks = compute_weight_masks(scores, 0.45, scope="global")
    pruned = torch.cat([scores[name][~masks[name]] for name in scores])
    kept = torch.cat([scores[name][masks[name]] for name in scores])
    assert pruned.max() <= kept.min()


def test_compute_weight_masks_per_layer_exact_count(scores):
    groups = {"a.weight": "layer.0", "b.weight": "layer.1", "c.weight": "layer.0"}
    masks = compute_weight_masks(scores, 0.35, scope="per_layer", groups=groups)
    layer0 = pruned_count(masks["a.weight"]) + pruned_count(masks["c.weight"])
    assert layer0 == round(0.35 * (8 * 12 + 7 * 4))
    assert pruned_count(masks["b.weight"]) == round(0.35 * 5 * 16)


def test_compute_weight_masks_per_layer_needs_groups(scores):
    with pytest.raises(ValueError, match="`groups` is required with scope='per_layer'"):
        compute_weight_masks(scores, 0.5, scope="per_layer")


def test_compute_weight_masks_per_layer_incomplete_groups_raise(scores):
    with pytest.raises(ValueError, match=r"`groups` has no layer key for \['b.weight', 'c.weight'\]"):
        compute_weight_masks(scores, 0.5, scope="per_layer", groups={"a.weight": "layer.0"})


def test_compute_weight_masks_ignored_groups_warn(scores):
    with pytest.warns(UserWarning, match="`groups` ignored"):
        compute_weight_masks(scores, 0.5, groups={"a.weight": "layer.0"})


@pytest.mark.parametrize("sparsity", [-0.1, 1.0])
def test_compute_weight_masks_sparsity_out_of_range_raises(scores, sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        compute_weight_masks(scores, sparsity)


def test_compute_weight_masks_unstructured_needs_sparsity(scores):
    with pytest.raises(TypeError, match="`sparsity` must be a float"):
        compute_weight_masks(scores, None)


def test_compute_weight_masks_unknown_scope_raises(scores):
    with pytest.raises(ValueError, match="`scope` must be one of"):
        compute_weight_masks(scores, 0.5, scope="per_block")


def test_compute_weight_masks_two_four_keeps_two_of_every_four(scores):
    masks = compute_weight_masks(scores, 0.5, pattern="2:4")
    for mask in masks.values():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(dim=-1) == 2).all()


def test_compute_weight_masks_two_four_keeps_largest(scores):
    mask = compute_weight_masks(scores, None, pattern="2:4")["a.weight"]
    groups = scores["a.weight"].reshape(8, 3, 4)
    kept = groups.topk(2, dim=-1).indices
    assert mask.reshape(8, 3, 4).gather(-1, kept).all()


def test_compute_weight_masks_n_m_along_given_input_dim():
    score = torch.rand(8, 3)
    mask = compute_weight_masks({"w": score}, None, pattern="1:4", input_dims={"w": 0})["w"]
    assert mask.shape == (8, 3)
    assert (mask.reshape(2, 4, 3).sum(dim=1) == 1).all()


def test_compute_weight_masks_n_m_indivisible_input_raises():
    with pytest.raises(
        ValueError, match=r"`w` has 6 inputs per output \(dims \(1,\)\), not a multiple of M=4"
    ):
        compute_weight_masks({"w": torch.rand(4, 6)}, None, pattern="2:4")


def test_compute_weight_masks_n_m_wrong_sparsity_raises(scores):
    with pytest.raises(ValueError, match=r"`sparsity` must be None or 0.5 \(1 - 2/4\)"):
        compute_weight_masks(scores, 0.3, pattern="2:4")


def test_compute_weight_masks_over_quantile_limit():
    score = torch.rand(4097, 4096, generator=torch.Generator().manual_seed(0))
    assert score.numel() > 2**24  # torch.quantile raises "input tensor is too large" from here on
    start = time.perf_counter()
    mask = compute_weight_masks({"w": score}, 0.5)["w"]
    assert time.perf_counter() - start < 5.0
    assert pruned_count(mask) == round(0.5 * score.numel())


def test_compute_weight_masks_of_50m_elements_are_exact_and_stay_exact_when_applied():
    from hf_gradprune.core.masks import apply_masks, compute_sparsity

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(10_000, 5_000, bias=False)  # 50M weights
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5_000, 10_000, generator=generator))
    mask = compute_weight_masks({"weight": layer.weight.detach().abs()}, 0.37)["weight"]
    assert pruned_count(mask) == round(0.37 * 50_000_000)
    apply_masks(layer, {"weight": mask})
    assert compute_sparsity(layer)["overall"] == round(0.37 * 50_000_000) / 50_000_000  # counted zeros
    scores = {
        "a": torch.rand(6_000, 5_000, generator=generator),
        "b": torch.rand(4_000, 5_000, generator=generator),
    }
    masks = compute_weight_masks(scores, 0.61, scope="global")
    assert sum(pruned_count(m) for m in masks.values()) == round(0.61 * 50_000_000)


def test_sparsity_at_step_one_shot():
    values = [sparsity_at_step(step, 0.5, 10, 20) for step in (0, 9, 10, 15, 100)]
    assert values == [0.0, 0.0, 0.5, 0.5, 0.5]


def test_sparsity_at_step_linear():
    values = [sparsity_at_step(step, 0.8, 10, 20, schedule="linear") for step in (5, 10, 15, 20, 30)]
    assert values == pytest.approx([0.0, 0.0, 0.4, 0.8, 0.8])


def test_sparsity_at_step_linear_holds_between_updates():
    values = [sparsity_at_step(step, 0.8, 10, 30, "linear", frequency=5) for step in (14, 15, 19, 20)]
    assert values == pytest.approx([0.0, 0.2, 0.2, 0.4])


def test_sparsity_at_step_cubic():
    values = [sparsity_at_step(step, 0.8, 0, 100, schedule="cubic") for step in (0, 25, 50, 100, 200)]
    assert values == pytest.approx([0.0, 0.8 * (1 - 0.75**3), 0.7, 0.8, 0.8])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "exponential"}, "`schedule` must be one of"),
        ({"target": 1.0}, r"`target` must be in \[0, 1\)"),
        ({"end_step": 5}, "`end_step` must be >= `start_step`"),
        ({"frequency": 0}, "`frequency` must be a positive number"),
        ({"step": -1}, "`step` and `start_step` must be >= 0"),
    ],
)
def test_sparsity_at_step_rejects_bad_arguments(kwargs, message):
    arguments = {"step": 0, "target": 0.5, "start_step": 10, "end_step": 20, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparsity_at_step(**arguments)


def test_compute_weight_masks_per_row_prunes_the_lowest_of_every_row(scores):
    masks = compute_weight_masks(scores, 0.5, scope="per_row")
    for name, score in scores.items():
        assert (~masks[name]).sum(dim=1).tolist() == [round(0.5 * score.shape[1])] * score.shape[0]
        for row, keep in zip(score, masks[name], strict=True):
            assert row[~keep].max() <= row[keep].min()


def test_compute_weight_masks_per_row_follows_input_dims():
    score = torch.arange(24.0).view(2, 3, 4)  # a convolution: 2 output channels, 3 x 4 inputs each
    transposed = score.flatten(1).t().contiguous()  # Conv1D layout: (inputs, outputs)
    conv = compute_weight_masks({"w": score}, 0.25, scope="per_row", input_dims={"w": (1, 2)})["w"]
    conv1d = compute_weight_masks({"w": transposed}, 0.25, scope="per_row", input_dims={"w": 0})["w"]
    assert (~conv).flatten(1).sum(dim=1).tolist() == [3, 3]
    assert torch.equal(conv1d, conv.flatten(1).t())
