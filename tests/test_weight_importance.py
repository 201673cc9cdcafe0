"""Weight importance: target modules and every scoring method against a direct computation."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_gradprune import PruningArguments, prune_weights, register_weight_criterion
from hf_gradprune.core.adapters import (
    find_target_modules,
    get_adapter,
    weight_input_dims,
    weight_layer_groups,
)
from hf_gradprune.weights.scoring import compute_weight_importance

from .helpers import build_tiny, quiet_cpu_args, tiny_batch, tiny_dataset

GRADIENT_METHODS = ("gradient", "taylor", "fisher", "obd", "combined")
SQUARED_METHODS = ("fisher", "obd")  # the empirical Fisher: squares of single examples' gradients


def batches(model, count=2):
    return [tiny_batch(model, seed=seed) for seed in range(count)]


def rows(data):
    """Every example of ``data`` as a batch of its own."""
    return [
        {k: v[i : i + 1] for k, v in batch.items()} for batch in data for i in range(len(batch["labels"]))
    ]


def direct_gradients(model, data):
    """Per batch, parameter name to its gradient from a plain ``loss.backward()`` on a copy in eval mode."""
    probe = copy.deepcopy(model).eval()
    gradients = []
    for batch in data:
        probe.zero_grad(set_to_none=True)
        probe(**batch).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in probe.named_parameters() if p.grad is not None})
    return gradients


def direct_score(method, weight, gradients):
    total = sum(gradients)
    if method == "gradient":
        return total.abs()
    if method == "taylor":
        return (weight * total).abs()
    if method == "fisher":
        return sum(g * g for g in gradients)
    if method == "obd":
        return weight.square() * sum(g * g for g in gradients)
    return weight.abs() / weight.abs().mean() + total.abs() / total.abs().mean()


def test_find_target_modules_default_follows_adapter(model_type):
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    paths = [path for structure in adapter.structures for path in structure.paths()]
    prefix = f"{model.base_model_prefix}.{adapter.layers}"
    expected = {f"{prefix}.{layer}.{path}" for layer in range(3) for path in paths if path}
    found = find_target_modules(model)
    assert set(found) == expected
    assert all(isinstance(module, (nn.Linear, Conv1D)) for module in found.values())


def test_find_target_modules_keeps_named_modules_order():
    model = build_tiny("llama")
    found = find_target_modules(model)
    assert list(found) == [name for name, _ in model.named_modules() if name in found]


def test_find_target_modules_default_excludes_head():
    found = find_target_modules(build_tiny("bert"))
    assert not [name for name in found if "classifier" in name or "pooler" in name or "embeddings" in name]


def test_find_target_modules_regex_selects_linears():
    found = find_target_modules(
        build_tiny("bert"), [r"layer\.1\.attention\.self\.(query|key)$", "classifier"]
    )
    assert list(found) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
        "classifier",
    ]


def test_find_target_modules_regex_skips_non_linear():
    assert list(find_target_modules(build_tiny("gpt2"), ["h.0"])) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]


def test_find_target_modules_no_match_raises():
    with pytest.raises(ValueError, match=r"`target_modules` \['nothing_here'\] matched no Linear, Conv1D"):
        find_target_modules(build_tiny("bert"), ["nothing_here"])


def test_find_target_modules_string_raises():
    with pytest.raises(TypeError, match="wrap it in a list"):
        find_target_modules(build_tiny("bert"), "query")


def test_find_target_modules_invalid_regex_raises():
    with pytest.raises(ValueError, match=r"entry 'query\(' is not a valid regular expression"):
        find_target_modules(build_tiny("bert"), ["query("])


def test_weight_input_dims_conv1d_is_zero():
    dims = weight_input_dims(build_tiny("gpt2"))
    assert set(dims.values()) == {(0,)}
    assert weight_input_dims(build_tiny("bert"))["bert.encoder.layer.0.attention.self.query.weight"] == (1,)


def test_weight_layer_groups_maps_blocks():
    groups = weight_layer_groups(build_tiny("llama"))
    assert groups["model.layers.0.mlp.down_proj.weight"] == "layer.0"
    assert groups["model.layers.1.self_attn.q_proj.weight"] == "layer.1"
    assert groups["model.layers.2.self_attn.o_proj.weight"] == "layer.2"
    assert len(groups) == 3 * 7


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_compute_weight_importance_matches_direct(model_type, method):
    model = build_tiny(model_type)
    data = batches(model)
    gradients = direct_gradients(model, rows(data) if method in SQUARED_METHODS else data)
    scores = compute_weight_importance(model, data, method=method, show_progress=False)
    params = dict(model.named_parameters())
    assert list(scores) == [f"{name}.weight" for name in find_target_modules(model)]
    for name, score in scores.items():
        expected = direct_score(method, params[name].detach(), [g[name] for g in gradients])
        torch.testing.assert_close(score, expected)


def test_compute_weight_importance_magnitude_is_abs_weight():
    model = build_tiny("gpt2")
    scores = compute_weight_importance(model, method="magnitude")
    weight = model.transformer.h[1].mlp.c_fc.weight
    torch.testing.assert_close(scores["transformer.h.1.mlp.c_fc.weight"], weight.detach().abs())


def test_compute_weight_importance_wanda_linear():
    model = build_tiny("bert")
    data = batches(model)
    scores = compute_weight_importance(model, data, method="wanda", show_progress=False)
    square_sum = 0
    for batch in data:
        hidden = model.eval().bert(batch["input_ids"], output_hidden_states=True).hidden_states[1]
        square_sum = square_sum + hidden.detach().pow(2).sum(dim=(0, 1))
    weight = model.bert.encoder.layer[1].attention.self.query.weight.detach()
    expected = weight.abs() * square_sum.sqrt()[None, :]
    torch.testing.assert_close(scores["bert.encoder.layer.1.attention.self.query.weight"], expected)


def test_compute_weight_importance_wanda_conv1d_scores_input_rows():
    model = build_tiny("gpt2")
    data = batches(model)
    scores = compute_weight_importance(model, data, method="wanda", show_progress=False)
    block = model.transformer.h[0]
    square_sum = 0
    for batch in data:
        embedded = model.eval().transformer(batch["input_ids"], output_hidden_states=True).hidden_states[0]
        square_sum = square_sum + block.ln_1(embedded).detach().pow(2).sum(dim=(0, 1))
    expected = block.attn.c_attn.weight.detach().abs() * square_sum.sqrt()[:, None]
    torch.testing.assert_close(scores["transformer.h.0.attn.c_attn.weight"], expected)


def test_compute_weight_importance_wanda_removes_hooks():
    model = build_tiny("llama")
    data = batches(model)
    compute_weight_importance(model, data, method="wanda", show_progress=False)
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_compute_weight_importance_leaves_model_untouched():
    model = build_tiny("bert")
    data = batches(model)
    model.train()
    model.bert.embeddings.requires_grad_(False)
    model(**data[0]).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    compute_weight_importance(model, data, method="taylor", show_progress=False)
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name])
        else:
            assert p.grad is None


def test_compute_weight_importance_num_batches_limits():
    model = build_tiny("bert")
    data = batches(model, 3)
    scores = compute_weight_importance(model, data, method="fisher", num_batches=1, show_progress=False)
    expected = compute_weight_importance(model, data[:1], method="fisher", show_progress=False)
    for name in scores:
        torch.testing.assert_close(scores[name], expected[name])


def test_compute_weight_importance_target_modules():
    model = build_tiny("bert")
    data = batches(model)
    scores = compute_weight_importance(model, data, "gradient", ["classifier"], show_progress=False)
    assert list(scores) == ["classifier.weight"]


def test_compute_weight_importance_needs_dataloader():
    with pytest.raises(ValueError, match="method='taylor' needs a `dataloader`"):
        compute_weight_importance(build_tiny("bert"), method="taylor")


def test_compute_weight_importance_empty_dataloader_raises():
    with pytest.raises(ValueError, match="`dataloader` yielded no batches"):
        compute_weight_importance(build_tiny("bert"), [], method="wanda", show_progress=False)


def test_compute_weight_importance_unknown_method_raises():
    with pytest.raises(ValueError, match="`method` must be one of 'magnitude'"):
        compute_weight_importance(build_tiny("bert"), method="hessian")


def test_compute_weight_importance_magnitude_warns_on_data():
    model = build_tiny("bert")
    with pytest.warns(UserWarning, match="ignored with method='magnitude'"):
        compute_weight_importance(model, batches(model), method="magnitude")


def test_compute_weight_importance_gblm_joins_gradient_norm_and_wanda():
    model = build_tiny("bert")
    data = batches(model)
    gblm = compute_weight_importance(model, data, method="gblm", gblm_alpha=3.0, show_progress=False)
    wanda = compute_weight_importance(model, data, method="wanda", show_progress=False)
    fisher = compute_weight_importance(model, data, method="fisher", show_progress=False)
    magnitude = compute_weight_importance(model, method="magnitude")
    for name, score in gblm.items():
        torch.testing.assert_close(score, 3.0 * fisher[name].sqrt() * magnitude[name] + wanda[name])


def test_compute_weight_importance_causal_lm_without_labels_uses_input_ids():
    model = build_tiny("llama")
    batch = tiny_batch(model)
    batch["attention_mask"][0, :2] = 0  # padding is left out of the loss
    labelled = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    expected = compute_weight_importance(model, [labelled], method="fisher", show_progress=False)
    from hf_gradprune.core import batches

    batches._warn_label_free.cache_clear()
    with pytest.warns(UserWarning, match=r"without `labels` on a causal LM: using labels = input_ids"):
        got = compute_weight_importance(model, [unlabelled], method="fisher", show_progress=False)
    for name, score in got.items():
        torch.testing.assert_close(score, expected[name])


def test_compute_weight_importance_several_methods_share_one_pass():
    model = build_tiny("gpt2")
    data = batches(model)
    methods = ["taylor", "obd", "gblm", "wanda", "magnitude"]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    together = compute_weight_importance(model, data, method=methods, show_progress=False)
    handle.remove()
    # one forward (and backward) per example for all five: obd and gblm square single examples' gradients,
    # so taylor's sum comes from the same passes
    assert len(calls) == len(rows(data))
    for method in methods:
        alone = compute_weight_importance(
            model, None if method == "magnitude" else rows(data), method=method, show_progress=False
        )
        for name, score in alone.items():
            torch.testing.assert_close(together[method][name], score)


def test_squared_gradients_skip_examples_without_loss():
    """A row of padding has no labelled token, so no loss: it is left out with a warning, the rest counts."""
    model = build_tiny("llama")
    batch = tiny_batch(model, batch_size=3)
    del batch["labels"]
    batch["attention_mask"][1] = 0  # the second row is all padding
    with pytest.warns(UserWarning, match="skipped 1 examples whose loss is not finite"):
        scores = compute_weight_importance(model, [batch], method="fisher", show_progress=False)
    kept = {k: v[[0, 2]] for k, v in batch.items()}
    expected = compute_weight_importance(model, [kept], method="fisher", show_progress=False)
    for name, score in scores.items():
        assert torch.isfinite(score).all()
        torch.testing.assert_close(score, expected[name])


@pytest.fixture
def square_of_gradient_sum():
    """A criterion registered for one test: ``(Σ g)²``, which no built-in criterion is."""
    from hf_gradprune.weights.criteria import WEIGHT_CRITERIA

    criterion = register_weight_criterion(
        "sum_squared", {"sum"}, lambda module, sums, alpha: sums["sum"] ** 2
    )
    yield criterion
    del WEIGHT_CRITERIA[criterion.name]


def test_register_weight_criterion_reaches_every_entry_point(square_of_gradient_sum):
    """One registration: the importance, prune_weights and the flag take the new criterion."""
    model = build_tiny("bert")
    batch = tiny_batch(model)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    scores = compute_weight_importance(model, [batch], method="sum_squared", show_progress=False)
    taylor = compute_weight_importance(model, [batch], method="gradient", show_progress=False)
    torch.testing.assert_close(scores[name], taylor[name] ** 2)
    masks = prune_weights(model, [batch], 0.5, method="sum_squared", show_progress=False)
    assert masks[name].float().mean() == 0.5
    assert (
        PruningArguments(weight_sparsity=0.5, weight_importance="sum_squared").weight_importance
        == "sum_squared"
    )


def test_weight_importance_flag_refuses_an_unregistered_criterion():
    with pytest.raises(
        ValueError, match=r"`--weight_importance` must be one of .*obd.*sparsegpt, got 'sum_squared'"
    ):
        PruningArguments(weight_sparsity=0.5, weight_importance="sum_squared")


def test_register_weight_criterion_refuses_duplicates_and_unknown_needs():
    with pytest.raises(ValueError, match="'obd' is already registered"):
        register_weight_criterion("obd", {"square"}, lambda module, sums, alpha: sums["square"])
    with pytest.raises(
        ValueError, match=r"`needs` must be drawn from 'sum', 'square', 'inputs', got \['hessian'\]"
    ):
        register_weight_criterion("new", {"hessian"}, lambda module, sums, alpha: sums["hessian"])


@pytest.fixture
def toy_criterion():
    """A criterion registered after import that needs no data: |w|³ (ranks as magnitude does)."""
    from hf_gradprune.weights.criteria import WEIGHT_CRITERIA

    register_weight_criterion(
        "toy_cube", set(), lambda module, sums, alpha: module.weight.detach().float().abs() ** 3
    )
    yield "toy_cube"
    del WEIGHT_CRITERIA["toy_cube"]


def test_registered_criterion_without_data_needs_prunes_with_no_batches(toy_criterion):
    model, reference = build_tiny("bert"), build_tiny("bert")
    masks = prune_weights(model, None, 0.5, method=toy_criterion, show_progress=False)
    expected = prune_weights(reference, None, 0.5, method="magnitude", show_progress=False)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)


def test_registered_criterion_runs_from_the_command_line(toy_criterion, tmp_path):
    from transformers import HfArgumentParser, Trainer

    from hf_gradprune import GradientPruningCallback
    from hf_gradprune.core.masks import get_masks

    (args,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        ["--weight_sparsity", "0.5", "--weight_importance", toy_criterion, "--sparsity_scope", "per_row"]
    )
    assert not args.weights_read_data
    model = build_tiny("bert").train()
    expected = prune_weights(
        build_tiny("bert"), None, 0.5, method="magnitude", scope="per_row", show_progress=False
    )
    trainer = Trainer(
        model=model,
        args=quiet_cpu_args(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=tiny_dataset(),
        callbacks=[GradientPruningCallback(args)],
    )
    trainer.train()
    masks = get_masks(model)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k].cpu(), expected[k]) for k in masks)
