"""Property-based tests of the public entry points: over generated arguments, each call either succeeds with a
model that still runs and whose masks and record agree with what was asked, or raises ``ValueError`` /
``TypeError`` naming the argument, with the model unchanged. Examples are bounded and derandomised (the same
cases every run; ``HF_GRADPRUNE_PROPERTY_EXAMPLES=500`` searches deeper); the number of cases that ran is
printed at the end of the session."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hf_gradprune import (
    PruningArguments,
    PruningRecord,
    compute_weight_masks,
    flops_ratio,
    load_pruned,
    prune_heads,
    prune_to_flops,
    prune_units,
    prune_weights,
    save_pruned,
)
from hf_gradprune.core.choices import SPARSITY_SCOPES
from hf_gradprune.core.masks import MASKS_FILENAME, apply_masks, compute_sparsity, get_masks
from hf_gradprune.training.arguments import LIVE_WEIGHT_METHODS

from .helpers import build_tiny, tiny_batch

#: Generated cases per property, counted as they run (``conftest.pytest_terminal_summary`` prints the sum).
CASES: Counter[str] = Counter()
EXAMPLES = int(os.environ.get("HF_GRADPRUNE_PROPERTY_EXAMPLES", "40"))
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FIELDS = {f.name: f for f in dataclasses.fields(PruningArguments)}


@pytest.fixture(autouse=True)
def count_cases(record_property):
    """The cases each test ran, as the ``generated_cases`` property of its report."""
    before = sum(CASES.values())
    yield
    record_property("generated_cases", sum(CASES.values()) - before)


def names_an_argument(error: Exception, names: tuple[str, ...]) -> bool:
    """Whether the message of ``error`` names one of ``names`` (as ``name`` or ``--name``)."""
    message = str(error)
    return any(name in message for name in names)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """What a refused call must leave as it was: the weights, the config and the masks."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    return {k: v.clone() for k, v in model.state_dict().items()}, config, get_masks(model)


def assert_unchanged(model: nn.Module, before: tuple[dict, dict, dict]) -> None:
    weights, config, masks = before
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert (model.config.to_dict() if hasattr(model, "config") else {}) == config
    assert get_masks(model).keys() == masks.keys()


def runs(model: nn.Module) -> None:
    """A forward pass gives finite logits."""
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch(model)).logits).all()


# --- PruningArguments ---------------------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "0", "0,3", "abc", "2:4", "3:2", "heads,ffn", "layers", "cubic", "wanda", "global"]),
    st.lists(st.sampled_from(["attention", "mlp", "(", ".*"]), max_size=2),
)


def field_value(name: str) -> st.SearchStrategy:
    """Values for field ``name``: its declared choices, and anything at all."""
    choices = FIELDS[name].metadata.get("choices")
    return st.one_of(st.sampled_from(choices), ANY_VALUE) if choices else ANY_VALUE


@BOUNDED
@given(st.data())
def test_pruning_arguments_accept_or_name_the_flag(data):
    names = data.draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    kwargs = {name: data.draw(field_value(name), label=name) for name in names}
    CASES["PruningArguments"] += 1
    try:
        args = PruningArguments(**kwargs)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error, tuple(FIELDS)), f"{kwargs}: {error}"
        return
    assert args.prune_step_list == sorted(set(args.prune_step_list))
    assert all(isinstance(step, int) and step >= 0 for step in args.prune_step_list)
    assert PruningArguments(**dataclasses.asdict(args)) == args  # what it holds is valid again


# --- compute_weight_masks and apply_masks -------------------------------------------------------------------

PATTERNS = ["unstructured", "2:4", "1:4", "4:2", "0:4", "2:0", "a:b", "2:4:8"]


@BOUNDED
@given(
    rows=st.integers(1, 6),
    columns=st.sampled_from([1, 3, 4, 8]),
    sparsity=st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(math.nan)),
    scope=st.sampled_from([*SPARSITY_SCOPES, "per_column"]),
    pattern=st.sampled_from(PATTERNS),
)
def test_compute_weight_masks_prunes_exactly_or_names_the_argument(rows, columns, sparsity, scope, pattern):
    CASES["compute_weight_masks"] += 1
    generator = torch.Generator().manual_seed(rows * 10 + columns)
    scores = {
        "a": torch.rand(rows, columns, generator=generator),
        "b": torch.rand(2, columns, generator=generator),
    }
    groups = {"a": "first", "b": "second"} if scope == "per_layer" else None
    try:
        masks = compute_weight_masks(scores, sparsity, scope=scope, pattern=pattern, groups=groups)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error, ("sparsity", "scope", "pattern", "groups", "N:M")), str(error)
        return
    assert masks.keys() == scores.keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == scores[name].shape
    if pattern == "unstructured" and scope == "per_tensor":
        for mask in masks.values():
            assert int((~mask).sum()) == round(sparsity * mask.numel())
    elif pattern != "unstructured":
        kept, block = (int(part) for part in pattern.split(":"))
        for mask in masks.values():
            assert (mask.reshape(-1, block).sum(-1) == kept).all()


MASK_NAMES = ["0.weight", "1.weight", "0.bias", "2.weight", "nope"]


@BOUNDED
@given(
    st.dictionaries(
        st.sampled_from(MASK_NAMES),
        st.tuples(
            st.sampled_from([(3, 4), (2, 3), (3,), (4, 3), (1,)]),
            st.sampled_from([torch.bool, torch.float32, torch.int64]),
            st.integers(0, 2**16),
        ),
        max_size=3,
    )
)
def test_apply_masks_zeroes_exactly_or_leaves_the_model_untouched(spec):
    CASES["apply_masks"] += 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    masks = {}
    for name, (shape, dtype, seed) in spec.items():
        values = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
        masks[name] = values.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        apply_masks(model, masks)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error, ("mask", *MASK_NAMES)), str(error)
        assert get_masks(model) == {}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return
    for name, mask in masks.items():
        weight = model.get_parameter(name).detach()
        assert (weight[~mask] == 0).all() and torch.equal(weight[mask], before[name][mask])
    model(torch.randn(2, 4)).sum().backward()
    for name, mask in masks.items():
        assert (model.get_parameter(name).grad[~mask] == 0).all()


# --- structures: prune_heads, prune_units, prune_to_flops --------------------------------------------------

UNITS = st.dictionaries(st.integers(-1, 3), st.lists(st.integers(-1, 40), max_size=5), max_size=3)


@BOUNDED
@given(heads=UNITS, neurons=UNITS, allow_empty=st.booleans(), family=st.sampled_from(["bert", "llama"]))
def test_prune_units_cuts_what_was_asked_or_nothing(heads, neurons, allow_empty, family):
    CASES["prune_units"] += 1
    model = build_tiny(family)
    before = snapshot(model)
    try:
        record = prune_units(model, {"heads": heads, "ffn": neurons}, allow_empty=allow_empty)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error, ("head", "neuron", "layer", "unit", "group", "allow_empty")), str(
            error
        )
        assert_unchanged(model, before)
        return
    assert record == PruningRecord.from_config(model.config)
    for layer, units in neurons.items():
        assert set(record.removed("ffn", layer)) >= set(units)
    runs(model)


@BOUNDED
@given(UNITS)
def test_prune_heads_cuts_what_was_asked_or_nothing(heads):
    CASES["prune_heads"] += 1
    model = build_tiny("bert")
    before = snapshot(model)
    try:
        prune_heads(model, heads)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error, ("head", "layer")), str(error)
        assert_unchanged(model, before)
        return
    pruned = PruningRecord.from_config(model.config).pruned_heads
    assert {layer: set(units) for layer, units in pruned.items()} == {
        layer: set(units) for layer, units in heads.items() if units
    }
    runs(model)


FLOPS = settings(BOUNDED, max_examples=max(1, EXAMPLES * 3 // 8))


@FLOPS
@given(
    ratio=st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)),
    rounds=st.integers(-1, 3),
    min_heads=st.integers(-1, 5),
    uniform=st.booleans(),
    layers=st.booleans(),
)
def test_prune_to_flops_meets_the_budget_or_changes_nothing(ratio, rounds, min_heads, uniform, layers):
    CASES["prune_to_flops"] += 1
    model = build_tiny("bert")
    batches = [tiny_batch(model, seed=seed) for seed in range(2)]
    before = snapshot(model)
    options = {"rounds": rounds, "min_heads_per_layer": min_heads, "uniform": uniform, "layers": layers}
    try:
        prune_to_flops(model, batches, ratio, seq_len=8, show_progress=False, **options)
    except (ValueError, TypeError) as error:
        names = ("ratio", "rounds", "min_heads_per_layer", "uniform", "layers", "allow_empty")
        assert names_an_argument(error, names), str(error)
        assert_unchanged(model, before)
        return
    assert flops_ratio(model, 8) <= ratio + 1e-6
    runs(model)


# --- prune_weights ------------------------------------------------------------------------------------------


@settings(BOUNDED, max_examples=max(1, EXAMPLES * 5 // 8))
@given(
    sparsity=st.one_of(st.none(), st.floats(-0.2, 1.2), st.just(math.nan)),
    method=st.sampled_from([*LIVE_WEIGHT_METHODS, "bogus"]),
    scope=st.sampled_from([*SPARSITY_SCOPES, "bogus"]),
    pattern=st.sampled_from(["unstructured", "2:4", "3:2", "x"]),
    sequential=st.booleans(),
)
def test_prune_weights_masks_to_the_sparsity_or_changes_nothing(sparsity, method, scope, pattern, sequential):
    CASES["prune_weights"] += 1
    model = build_tiny("llama")
    batches = [tiny_batch(model, seed=seed, length=8) for seed in range(2)]
    before = snapshot(model)
    try:
        masks = prune_weights(
            model, batches, sparsity, method, scope, pattern, sequential=sequential, show_progress=False
        )
    except (ValueError, TypeError) as error:
        names = ("sparsity", "method", "scope", "pattern", "sequential", "global", "N:M")
        assert names_an_argument(error, names), str(error)
        assert_unchanged(model, before)
        return
    assert masks.keys() == get_masks(model).keys() and masks
    real = compute_sparsity(model)["overall"]
    assert real == pytest.approx(0.5 if pattern == "2:4" else sparsity, abs=0.05)
    runs(model)


# --- load_pruned ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A tiny BERT with heads cut and half its weights masked, saved."""
    model = build_tiny("bert")
    prune_heads(model, {0: [1], 2: [0, 3]})
    prune_weights(model, None, 0.5, "magnitude", show_progress=False)
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_pruned(model, folder)
    return folder, model


@BOUNDED
@given(
    keep=st.sets(st.sampled_from(["config.json", "model.safetensors", MASKS_FILENAME])),
    truncate=st.sampled_from([None, "config.json", "model.safetensors", MASKS_FILENAME]),
)
def test_load_pruned_gives_the_model_back_or_says_what_is_missing(saved, tmp_path_factory, keep, truncate):
    CASES["load_pruned"] += 1
    source, model = saved
    folder = tmp_path_factory.mktemp("partial")
    for name in keep:
        shutil.copy(source / name, folder / name)
    if truncate in keep:
        data = (folder / truncate).read_bytes()
        (folder / truncate).write_bytes(data[: len(data) // 2])
    # Without its masks file, a folder gives its masks back from the weights' zeros (the record counts them).
    complete = {"config.json", "model.safetensors"} <= keep and truncate not in keep
    try:
        loaded = load_pruned(folder)
    except (ValueError, OSError) as error:
        assert not complete, error
        missing = {"config.json", "model.safetensors", MASKS_FILENAME} - keep
        named = missing | ({truncate} if truncate in keep else set())
        assert any(name in str(error) for name in named) or "no model" in str(error), str(error)
        return
    assert complete, f"loaded from {sorted(keep)} with {truncate} cut short"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    masks, loaded_masks = get_masks(model), get_masks(loaded)
    assert masks.keys() == loaded_masks.keys() and all(torch.equal(masks[k], loaded_masks[k]) for k in masks)
