"""One-shot weight scoring in bounded memory: ``prune_weights(..., scoring_passes=N)`` scores groups of
consecutive layers in passes of their own, the block activations recomputed in backward (checkpointing), and
must choose exactly the masks of one pass."""

import copy

import pytest
import torch

from hf_gradprune import PruningArguments, PruningTrainer, prune_weights
from hf_gradprune.core.adapters import get_adapter
from hf_gradprune.core.masks import get_masks

from .helpers import build_tiny, quiet_cpu_args, tiny_batch, tiny_dataset

METHODS = ("magnitude", "taylor", "obd", "wanda", "gblm")


def prune(model, data, passes, method="obd", **options):
    options = {"scope": "per_row", "show_progress": False, **options}
    return prune_weights(model, data, 0.5, method=method, scoring_passes=passes, **options)


def assert_same_pruning(first, second, masks_first, masks_second):
    assert masks_first.keys() == masks_second.keys()
    for name, mask in masks_first.items():
        assert torch.equal(mask, masks_second[name]), name
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def assert_passes_choose_the_masks_of_one_pass(model_type, method):
    model = build_tiny(model_type)
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    one, three = copy.deepcopy(model), copy.deepcopy(model)
    masks_one = prune(one, data, 1, method)
    masks_three = prune(three, data, 3, method)
    assert_same_pruning(one, three, masks_one, masks_three)
    assert all(0.4 < mask.float().mean() <= 0.6 for mask in masks_three.values())


def test_scoring_passes_choose_the_masks_of_one_pass_on_every_family(model_type):
    assert_passes_choose_the_masks_of_one_pass(model_type, "obd")


@pytest.mark.parametrize("method", [method for method in METHODS if method != "obd"])
def test_scoring_passes_choose_the_masks_of_one_pass_with_every_criterion(method):
    """gblm gathers forward statistics too: the recomputed forwards must not count them again."""
    assert_passes_choose_the_masks_of_one_pass("llama", method)


@pytest.mark.parametrize(("scope", "pattern"), [("per_layer", "unstructured"), ("per_tensor", "2:4")])
def test_scoring_passes_keep_scopes_and_patterns(scope, pattern):
    model = build_tiny("llama")
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    sparsity = None if pattern != "unstructured" else 0.5
    options = {"scope": scope, "pattern": pattern, "show_progress": False, "method": "obd"}
    options["target_modules"] = [r"\.(q|k|v|o|gate|up)_proj$"]  # down_proj has 37 inputs
    masks_one = prune_weights(one, data, sparsity, scoring_passes=1, **options)
    masks_two = prune_weights(two, data, sparsity, scoring_passes=2, **options)
    assert_same_pruning(one, two, masks_one, masks_two)


def test_scoring_passes_score_every_group_on_the_model_as_it_came():
    """One shot: a later group is scored on the dense model, not on the earlier groups already pruned (the
    control, the same groups pruned one after the other, chooses other masks)."""
    model = build_tiny("llama")
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    passes, sequential = copy.deepcopy(model), copy.deepcopy(model)
    masks = prune(passes, data, 3)
    later = prune(sequential, data, 1, sequential=True)
    assert any(not torch.equal(masks[name], later[name]) for name in masks)


def test_scoring_passes_recompute_block_activations_and_count_inputs_once():
    """Three passes over 4 examples: the first block's linear runs once per example and pass, and again in
    backward while its own group is scored (checkpointing); Wanda's input sums see each forward once."""
    model = build_tiny("llama")
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    calls = []
    linear = get_adapter(model).blocks(model)[0].mlp.up_proj
    handle = linear.register_forward_hook(lambda *_: calls.append(1))
    prune(copy.deepcopy(model), data, 1)
    one_pass = len(calls)
    calls.clear()
    prune(model, data, 3)
    handle.remove()
    assert (one_pass, len(calls)) == (4, 4 * 3 + 4)


def test_scoring_passes_keep_masks_already_applied():
    model = build_tiny("llama")
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    before = {name: mask.clone() for name, mask in prune(model, data, 2, method="magnitude").items()}
    one, three = copy.deepcopy(model), copy.deepcopy(model)
    masks_one = prune(one, data, 1, method="taylor", scope="per_tensor")
    masks_three = prune(three, data, 3, method="taylor", scope="per_tensor")
    assert_same_pruning(one, three, masks_one, masks_three)
    assert all(not (masks_three[name] & ~before[name]).any() for name in before)


def test_scoring_passes_score_a_bfloat16_model_without_a_float32_copy():
    model = build_tiny("llama").to(torch.bfloat16)
    data = [tiny_batch(model, seed=seed) for seed in range(2)]
    reference = copy.deepcopy(model)
    masks = prune(model, data, 3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_same_pruning(reference, model, prune(reference, data, 1), masks)


def test_scoring_passes_on_any_module_group_its_layers():
    """A model of no registered family: each target module is a layer, scored without checkpointing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
    )
    data = [{"input": torch.randn(5, 6)}]
    targets = [r"^[02]$"]
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    masks_one = prune_weights(one, data, 0.5, method="wanda", target_modules=targets, scoring_passes=1)
    masks_two = prune_weights(two, data, 0.5, method="wanda", target_modules=targets, scoring_passes=5)
    assert_same_pruning(one, two, masks_one, masks_two)


@pytest.mark.parametrize(
    ("passes", "options"),
    [(0, {}), (True, {}), ("2", {}), (2.0, {}), (2, {"sequential": True}), (2, {"scope": "global"})],
)
def test_scoring_passes_refused_by_name(passes, options):
    model = build_tiny("llama")
    data = [tiny_batch(model)]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="`scoring_passes`"):
        prune(model, data, passes, **options)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_scoring_passes_flag_prunes_in_training_as_one_pass(tmp_path):
    """``--scoring_passes 3`` through ``PruningTrainer``: the masks and weights of ``--scoring_passes 1``,
    from more forwards of the first block (the control that the flag reaches the scoring)."""
    models, calls = [], {}
    for passes in (1, 3):
        model = build_tiny("llama")
        calls[passes] = []
        linear = get_adapter(model).blocks(model)[0].mlp.up_proj
        linear.register_forward_hook(lambda *_, count=calls[passes]: count.append(1))
        options = {"weight_sparsity": 0.5, "weight_importance": "obd", "importance_batches": 2}
        trainer = PruningTrainer(
            model=model,
            args=quiet_cpu_args(tmp_path / str(passes), max_steps=2, seed=0),
            train_dataset=tiny_dataset(causal=True),
            pruning_args=PruningArguments(**options, scoring_passes=passes),
        )
        trainer.train()
        models.append(model)
    assert_same_pruning(*models, get_masks(models[0]), get_masks(models[1]))
    assert len(get_masks(models[1])) == 21
    assert len(calls[3]) > len(calls[1])


@pytest.mark.real
def test_smollm2_obd_in_passes_chooses_the_masks_of_one_pass(smollm2):
    model, tokenizer = smollm2
    encoded = tokenizer(
        ["Pruning in passes keeps the masks.", "A film worth seeing twice."],
        padding=True,
        return_tensors="pt",
    )
    targets = [r"model\.layers\.(0|1|29)\.(self_attn|mlp)\.\w+_proj"]
    one, four = copy.deepcopy(model), copy.deepcopy(model)
    masks_one = prune(one, [dict(encoded)], 1, target_modules=targets)
    masks_four = prune(four, [dict(encoded)], 4, target_modules=targets)
    assert len(masks_one) == 21
    assert_same_pruning(one, four, masks_one, masks_four)
