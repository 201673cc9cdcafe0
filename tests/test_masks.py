"""Persistent weight masks: zeros that survive training, unchanged keys, masks files."""

import copy
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

from hf_gradprune.core.adapters import find_target_modules, weight_input_dims
from hf_gradprune.core.mask_files import load_masks, save_masks
from hf_gradprune.core.masks import (
    MASKS_FILENAME,
    apply_masks,
    compute_sparsity,
    get_masks,
    is_masked,
    reapply_masks,
    remove_masks,
)
from hf_gradprune.weights.scoring import compute_weight_importance
from hf_gradprune.weights.sparsity import compute_weight_masks

from .helpers import build_tiny, tiny_batch

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def model():
    return build_tiny("bert")


@pytest.fixture
def masks(model):
    generator = torch.Generator().manual_seed(0)
    return {
        f"{name}.weight": torch.rand(module.weight.shape, generator=generator) > 0.5
        for name, module in find_target_modules(model).items()
    }


@pytest.fixture
def batches(model):
    return [tiny_batch(model, batch_size=4, length=8, seed=seed) for seed in range(2)]


def assert_pruned_zero(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name


def test_apply_masks_zeros_pruned_weights(model, masks):
    apply_masks(model, masks)
    assert_pruned_zero(model, masks)


def test_apply_masks_keeps_other_weights(model, masks):
    before = model.get_parameter(QUERY).detach().clone()
    apply_masks(model, masks)
    assert torch.equal(model.get_parameter(QUERY)[masks[QUERY]], before[masks[QUERY]])


def test_apply_masks_keeps_state_dict_keys(model, masks):
    keys = list(model.state_dict())
    apply_masks(model, masks)
    assert list(model.state_dict()) == keys


def test_apply_masks_stores_non_persistent_buffer(model, masks):
    apply_masks(model, masks)
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["bert.encoder.layer.0.attention.self.query.weight_mask"], masks[QUERY])
    assert not [key for key in model.state_dict() if key.endswith("_mask")]


def test_apply_masks_reload_has_no_missing_keys(model, masks, tmp_path):
    apply_masks(model, masks)
    model.save_pretrained(tmp_path)
    reloaded, info = BertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_pruned_zero(reloaded, masks)


def test_apply_masks_zeroes_pruned_gradients(model, masks, batches):
    apply_masks(model, masks)
    model(**batches[0]).loss.backward()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name].grad[~mask] == 0).all()
        assert params[name].grad[mask].abs().sum() > 0


def test_apply_masks_zeroes_probe_gradients(model, masks, batches):
    apply_masks(model, masks)
    scores = compute_weight_importance(model, batches, method="fisher", show_progress=False)
    assert all((scores[name][~mask] == 0).all() for name, mask in masks.items())


def test_apply_masks_unknown_name_raises(model):
    with pytest.raises(
        ValueError, match=r"has no parameter \['bert.nope.weight'\].*such as \['bert.embeddings"
    ):
        apply_masks(model, {"bert.nope.weight": torch.ones(2, dtype=torch.bool)})


def test_apply_masks_shape_mismatch_leaves_model_unchanged(model, masks):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = {**masks, "classifier.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(
        ValueError, match=r"The mask of 'classifier.weight' has shape \(3, 3\), the parameter"
    ):
        apply_masks(model, bad)
    assert not is_masked(model)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_apply_masks_non_bool_raises(model, masks):
    with pytest.raises(TypeError, match=r"The mask of '.*query.weight' must be a torch.bool tensor.*float32"):
        apply_masks(model, {QUERY: masks[QUERY].float()})


def test_apply_masks_frozen_parameter_is_zeroed_and_hooked_once_it_trains(model, masks, batches):
    weight = model.get_parameter(QUERY).requires_grad_(False)  # a LoRA base weight, say
    apply_masks(model, {QUERY: masks[QUERY]})
    assert bool((weight[~masks[QUERY]] == 0).all())
    weight.requires_grad_(True)
    reapply_masks(model)  # after an optimizer step: the unfrozen weight gets its gradient hook
    model(**batches[0]).loss.backward()
    assert bool((weight.grad[~masks[QUERY]] == 0).all()) and bool(weight.grad[masks[QUERY]].abs().sum() > 0)


def test_apply_masks_replaces_previous_mask(model, masks, batches):
    apply_masks(model, {QUERY: masks[QUERY]})
    apply_masks(model, {QUERY: torch.ones_like(masks[QUERY])})
    param = model.get_parameter(QUERY)
    assert len(param._backward_hooks) == 1
    model(**batches[0]).loss.backward()
    assert (param.grad[~masks[QUERY]] != 0).any()


def test_apply_masks_bfloat16_parameters(model, masks, batches):
    model.to(torch.bfloat16)
    apply_masks(model, masks)
    model(**batches[0]).loss.backward()
    params = dict(model.named_parameters())
    assert all((params[name].grad[~mask] == 0).all() for name, mask in masks.items())
    assert_pruned_zero(model, masks)


def test_apply_masks_follows_model_to(model, masks, batches):
    apply_masks(model, masks)
    model.to(torch.float64)
    model(**batches[0]).loss.backward()
    grad = model.get_parameter(QUERY).grad
    assert grad.dtype == torch.float64 and (grad[~masks[QUERY]] == 0).all()
    assert get_masks(model)[QUERY].dtype == torch.bool


def test_apply_masks_restores_hooks_on_copy(model, masks, batches):
    apply_masks(model, masks)
    clone = copy.deepcopy(model)
    apply_masks(clone, get_masks(clone))
    clone(**batches[0]).loss.backward()
    assert (clone.get_parameter(QUERY).grad[~masks[QUERY]] == 0).all()


def test_masks_survive_adamw_bf16_autocast(model, masks, batches):
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in masks}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.1)
    model.train()
    for _ in range(30):
        for batch in batches:  # two micro-batches accumulated per step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        reapply_masks(model)
    for name, mask in masks.items():
        param = params[name]
        assert (param[~mask] == 0).all()
        assert (optimizer.state[param]["exp_avg"][~mask] == 0).all()
        assert not torch.equal(param[mask], before[name][mask])


def test_reapply_masks_undoes_momentum(model, masks, batches):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1)
    for _ in range(2):
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    apply_masks(model, masks)
    model(**batches[0]).loss.backward()
    optimizer.step()
    pruned = model.get_parameter(QUERY)[~masks[QUERY]]
    assert (pruned != 0).any()  # the momentum gathered before the mask moved them
    reapply_masks(model)
    assert_pruned_zero(model, masks)


def test_remove_masks_keeps_zeros(model, masks):
    apply_masks(model, masks)
    remove_masks(model)
    assert_pruned_zero(model, masks)


def test_remove_masks_drops_hooks_and_buffers(model, masks):
    apply_masks(model, masks)
    remove_masks(model)
    assert not is_masked(model)
    assert not [name for name, _ in model.named_buffers() if name.endswith("_mask")]
    assert not any(p._backward_hooks for p in model.parameters())


def test_is_masked_sees_submodules(model, masks):
    apply_masks(model, {QUERY: masks[QUERY]})
    assert is_masked(model) and is_masked(model.bert.encoder.layer[0])
    assert not is_masked(model.bert.encoder.layer[1])


def test_get_masks_returns_cpu_copies(model, masks):
    apply_masks(model, masks)
    found = get_masks(model)
    assert list(found) == list(masks)
    assert all(
        torch.equal(found[name], mask) and found[name].device.type == "cpu" for name, mask in masks.items()
    )
    found[QUERY].fill_(True)
    assert torch.equal(get_masks(model)[QUERY], masks[QUERY])


def test_save_masks_load_masks_roundtrip(masks, tmp_path):
    save_masks(masks, tmp_path / MASKS_FILENAME)
    loaded = load_masks(tmp_path / MASKS_FILENAME)
    assert set(loaded) == set(masks)
    assert all(torch.equal(loaded[name], mask) for name, mask in masks.items())


def test_save_masks_stores_uint8_with_metadata(masks, tmp_path):
    save_masks(masks, tmp_path / MASKS_FILENAME)
    with safe_open(tmp_path / MASKS_FILENAME, framework="pt") as masks_file:
        assert masks_file.metadata() == {"format": "pt", "hf_gradprune": "weight_masks"}
        assert masks_file.get_tensor(QUERY).dtype == torch.uint8


def test_save_masks_leaves_only_the_file(masks, tmp_path):
    save_masks(masks, tmp_path / MASKS_FILENAME)
    save_masks(masks, tmp_path / MASKS_FILENAME)
    assert [path.name for path in tmp_path.iterdir()] == [MASKS_FILENAME]


def test_save_masks_non_bool_raises(tmp_path):
    with pytest.raises(TypeError, match=r"The mask of 'w' must be a torch\.bool tensor"):
        save_masks({"w": torch.ones(2)}, tmp_path / MASKS_FILENAME)


def test_load_masks_rejects_foreign_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a masks file of hf_gradprune"):
        load_masks(tmp_path / "model.safetensors")


def test_compute_sparsity_counts_real_zeros(model, masks):
    apply_masks(model, masks)
    expected = {name: float((~mask).float().mean()) for name, mask in masks.items()}
    sparsity = compute_sparsity(model)
    assert sparsity[QUERY] == pytest.approx(expected[QUERY])
    with torch.no_grad():
        model.get_parameter(QUERY)[masks[QUERY]] = 0.0
    assert compute_sparsity(model)[QUERY] == 1.0


def test_compute_sparsity_overall_weighs_by_size(model, masks):
    apply_masks(model, masks)
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    assert compute_sparsity(model, masks)["overall"] == pytest.approx(pruned / total)


def test_compute_sparsity_without_masks_raises(model):
    with pytest.raises(ValueError, match="`model` has no masks"):
        compute_sparsity(model)


def test_masks_two_four_on_conv1d_along_inputs():
    model = build_tiny("gpt2")
    scores = compute_weight_importance(model, method="magnitude")
    apply_masks(model, compute_weight_masks(scores, 0.5, pattern="2:4", input_dims=weight_input_dims(model)))
    weight = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
    groups = (weight != 0).reshape(8, 4, weight.shape[1]).sum(dim=1)
    assert (groups == 2).all()


def test_mask_hook_zeroes_an_expanded_gradient():
    """``weight.sum()`` hands backward a gradient with one element for every entry (stride 0): it cannot be
    zeroed in place, and is not left unmasked either."""
    layer = torch.nn.Linear(4, 2)
    mask = torch.tensor([[True, False] * 2] * 2)
    apply_masks(layer, {"weight": mask})
    layer.weight.sum().backward()
    assert torch.equal(layer.weight.grad, mask.float())


def test_reapply_hooks_a_parameter_replaced_since_its_mask_was_applied():
    """A wrapper that swaps in new parameters (``fully_shard`` does) or a pickled copy leaves a mask without
    a gradient hook; ``reapply_masks`` zeroes the new parameter and hooks it, so the masked gradient is zero
    from the next backward on. The control: before ``reapply_masks``, the new parameter's gradient is not."""
    layer = torch.nn.Linear(4, 2)
    mask = torch.tensor([[True, False] * 2] * 2)
    apply_masks(layer, {"weight": mask})
    layer.weight = torch.nn.Parameter(torch.ones(2, 4))
    (layer.weight * 2).sum().backward()
    assert torch.equal(layer.weight.grad, torch.full((2, 4), 2.0))
    layer.weight.grad = None
    reapply_masks(layer)
    assert torch.equal(layer.weight.detach(), mask.float())
    (layer.weight * 2).sum().backward()
    assert torch.equal(layer.weight.grad, 2 * mask.float())
    restored = pickle.loads(pickle.dumps(layer))
    reapply_masks(restored)
    (restored.weight * 3).sum().backward()
    assert torch.equal(restored.weight.grad, 3 * mask.float())


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_record_counts_every_masked_entry_through_layer_by_layer_pruning_and_surgery(model_type):
    from hf_gradprune import PruningRecord, prune_heads, prune_layers, prune_weights

    model = build_tiny(model_type)
    prune_weights(model, [tiny_batch(model)], 0.5, "wanda", sequential=True, show_progress=False)
    prune_heads(model, {0: [1]} if model_type == "bert" else {0: [0, 1]})  # cuts masked rows
    prune_layers(model, [1])  # the masks after it move up a layer
    prune_weights(model, None, 0.7, "magnitude", show_progress=False)
    counted = PruningRecord.from_config(model.config).masked_entries
    assert counted == {name: int((~mask).sum()) for name, mask in get_masks(model).items()}
