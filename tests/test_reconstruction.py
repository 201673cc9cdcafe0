"""SparseGPT against a direct Optimal Brain Surgeon computation, the block-wise engine against a model
replayed block by block, and the reconstructions: masks exact, outputs restored."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from hf_gradprune import PruningArguments, PruningTrainer, load_pruned, prune_weights
from hf_gradprune.core.adapters import find_target_modules, get_adapter, weight_dims
from hf_gradprune.core.masks import get_masks
from hf_gradprune.weights.blockwise import _gather, capture_block_inputs, prune_blockwise
from hf_gradprune.weights.reconstruction import add_to_hessian, least_squares_update, sparsegpt_prune
from hf_gradprune.weights.sparsity import outlier_ratio, owl_sparsities

from .helpers import DECODER, build_tiny, logits, quiet_cpu_args, tiny_batch, tiny_dataset


def tiny_llama() -> transformers.LlamaForCausalLM:
    """A tiny Llama whose every input width is a multiple of 4 (for 2:4)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**DECODER, "intermediate_size": 40})
    ).eval()


def direct_obs(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity=None, n_m=None, per_row=False, keep=None, block=128
):
    """SparseGPT written out in float64 with an explicit inverse of the Hessian of the columns left at each
    step (no Cholesky factor, no lazy blocks): the reference."""
    W = weight.double().clone()
    H = hessian.double().clone()
    H += 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    columns = W.shape[1]
    inverse = [torch.linalg.inv(H[j:, j:]) for j in range(columns)]  # H⁻¹ of the columns from j on
    pruned = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep
    for j in range(columns):
        if sparsity is not None and j % block == 0:
            cols = range(j, min(j + block, columns))
            saliency = torch.stack([W[:, c] ** 2 / inverse[c][0, 0] for c in cols], dim=1)
            if per_row:
                count = round(sparsity * saliency.shape[1])
                lowest = saliency.argsort(dim=1)[:, :count]
                chosen = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, lowest, True)
            else:
                flat = saliency.flatten()
                chosen = torch.zeros_like(flat, dtype=torch.bool)
                chosen[flat.argsort()[: int(flat.numel() * sparsity)]] = True
                chosen = chosen.view_as(saliency)
            pruned[:, j : j + len(cols)] = chosen
        if n_m is not None and j % n_m[1] == 0:
            n, m = n_m
            saliency = torch.stack([W[:, c] ** 2 / inverse[c][0, 0] for c in range(j, j + m)], dim=1)
            lowest = saliency.argsort(dim=1)[:, : m - n]
            pruned[:, j : j + m] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, lowest, True)
        error = torch.where(pruned[:, j], W[:, j], torch.zeros_like(W[:, j])) / inverse[j][0, 0]
        W[:, j:] -= error.unsqueeze(1) * inverse[j][0].unsqueeze(0)
        W[:, j][pruned[:, j]] = 0
    return W.float(), ~pruned


def layer_case(rows=12, columns=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(300, columns, generator=generator) @ torch.randn(
        columns, columns, generator=generator
    )
    hessian, count = torch.zeros(columns, columns), [0]
    add_to_hessian(hessian, count, inputs[:150])
    add_to_hessian(hessian, count, inputs[150:])
    return torch.randn(rows, columns, generator=generator), hessian, inputs


def test_add_to_hessian_is_two_x_xt_over_n():
    _, hessian, inputs = layer_case()
    assert torch.allclose(hessian, 2 * inputs.T @ inputs / len(inputs), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        {"sparsity": 0.5},
        {"sparsity": 0.5, "per_row": True},
        {"sparsity": 0.6, "per_row": True},
        {"n_m": (2, 4)},
        {"n_m": (1, 4)},
    ],
    ids=["unstructured", "per-row", "per-row-60", "2:4", "1:4"],
)
@pytest.mark.parametrize("blocksize", [128, 16, 12])
def test_sparsegpt_equals_the_direct_obs_computation(options, blocksize):
    weight, hessian, _ = layer_case()
    new, keep = sparsegpt_prune(weight, hessian, blocksize=blocksize, **options)
    block = blocksize if "sparsity" in options else 128
    expected, expected_keep = direct_obs(weight, hessian, block=block, **options)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(new, expected, atol=2e-4, rtol=1e-3), (new - expected).abs().max()
    assert bool((new[~keep] == 0).all())


def test_least_squares_update_is_the_optimum_under_the_mask_and_beats_sparsegpt_s_update():
    weight, hessian, inputs = layer_case()
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    new = least_squares_update(weight, hessian, keep, tolerance=1e-6)
    damped = hessian.double() + 0.01 * torch.diag(hessian).mean() * torch.eye(hessian.shape[0])
    for row in range(weight.shape[0]):
        kept = keep[row]
        expected = torch.linalg.solve(damped[kept][:, kept], damped[kept] @ weight[row].double())
        assert torch.allclose(new[row, kept].double(), expected, atol=1e-3, rtol=1e-3)
    assert bool((new[~keep] == 0).all())
    error = ((inputs @ (new - weight).T) ** 2).mean()
    zeroed = ((inputs @ (weight * keep - weight).T) ** 2).mean()
    sequential, _ = direct_obs(weight, hessian, keep=keep)
    assert error < 0.6 * zeroed and error < 0.7 * ((inputs @ (sequential - weight).T) ** 2).mean()


def test_sparsegpt_prunes_inputs_that_never_fire():
    weight, hessian, _ = layer_case()
    hessian[3, :] = hessian[:, 3] = 0
    new, keep = sparsegpt_prune(weight, hessian, sparsity=0.25)
    assert not keep[:, 3].any() and bool((new[:, 3] == 0).all())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of"),
        ({"sparsity": 0.5, "n_m": (2, 4)}, "exactly one of"),
        ({"n_m": (2, 3)}, "40 inputs are not a multiple of M=3"),
        ({"n_m": (2, 8), "blocksize": 12}, "`blocksize` 12 is not a multiple of M=8"),
    ],
)
def test_sparsegpt_bad_arguments(arguments, message):
    weight, hessian, _ = layer_case()
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(weight, hessian, **arguments)


def calibration(model, count=3):
    return [tiny_batch(model, batch_size=2, length=8, seed=seed) for seed in range(count)]


def replayed_sparsegpt(model, batches, pattern):
    """The straightforward reference: for each block, the whole model (earlier blocks already pruned) runs on
    every calibration example to gather the block's Hessians, then each of its layers is pruned."""
    modules = find_target_modules(model)
    blocks = get_adapter(model).blocks(model)
    names = {id(m): name for name, m in model.named_modules()}
    for block in blocks:
        prefix = names[id(block)] + "."
        group = {name: m for name, m in modules.items() if name.startswith(prefix)}
        hessians = {name: (torch.zeros(m.in_features, m.in_features), [0]) for name, m in group.items()}

        def hook(hessian, count, _module, args):
            add_to_hessian(hessian, count, args[0])

        handles = [
            m.register_forward_pre_hook(functools.partial(hook, *hessians[name])) for name, m in group.items()
        ]
        with torch.no_grad():
            for batch in batches:
                for row in range(batch["input_ids"].shape[0]):
                    model(input_ids=batch["input_ids"][row : row + 1], use_cache=False)
        for handle in handles:
            handle.remove()
        for name, module in group.items():
            n_m = (2, 4) if pattern == "2:4" else None
            new, _ = sparsegpt_prune(
                module.weight, hessians[name][0], sparsity=None if n_m else 0.5, n_m=n_m, per_row=True
            )
            with torch.no_grad():
                module.weight.copy_(new)
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_blockwise_sparsegpt_equals_replaying_the_model_block_by_block(pattern):
    model = tiny_llama()
    reference = replayed_sparsegpt(tiny_llama(), calibration(model), pattern)
    sparsity = None if pattern == "2:4" else 0.5
    masks = prune_weights(
        model,
        calibration(model),
        sparsity,
        method="sparsegpt",
        scope="per_row",
        pattern=pattern,
        show_progress=False,
    )
    assert masks.keys() == {f"{name}.weight" for name in find_target_modules(model)}
    for name, param in model.named_parameters():
        assert torch.allclose(param, reference.get_parameter(name), atol=1e-4), name
    assert get_masks(model).keys() == masks.keys()


@pytest.mark.parametrize("method", ["wanda", "obd", "sparsegpt"])
def test_blockwise_prunes_every_family_exactly(model_type, method):
    model = build_tiny(model_type)
    masks = prune_weights(
        model, calibration(model), 0.5, method=method, scope="per_row", sequential=True, show_progress=False
    )
    assert masks.keys() == {f"{name}.weight" for name in find_target_modules(model)}
    for name, keep in masks.items():
        weight = model.get_parameter(name)
        rows = keep.T if weight_dims(model.get_submodule(name.rsplit(".", 1)[0]))[0] == 1 else keep
        kept = rows.shape[1] - round(0.5 * rows.shape[1])
        assert bool((weight[~keep] == 0).all()) and bool((rows.sum(dim=1) == kept).all()), name
    assert torch.isfinite(logits(model, tiny_batch(model))).all()


def test_blockwise_per_example_gradients_are_those_of_each_example_alone():
    model = tiny_llama()
    block = get_adapter(model).blocks(model)[1]
    modules = {name: m for name, m in find_target_modules(model).items() if ".layers.1." in name}
    batches = calibration(model, count=2)
    hidden, calls = capture_block_inputs(model, get_adapter(model).blocks(model), batches)
    stats, _ = _gather(block, modules, calls[1], hidden, {"sum", "square"})
    weights = [m.weight for m in modules.values()]
    expected = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    for (_, kwargs), x in zip(calls[1], hidden, strict=True):
        for row in range(x.shape[0]):

            def row_of(value, row=row, size=x.shape[0]):
                if isinstance(value, tuple):
                    return tuple(row_of(v) for v in value)
                is_batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
                return value[row : row + 1] if is_batched else value

            output = block(x[row : row + 1], **{k: row_of(v) for k, v in kwargs.items()})
            grads = torch.autograd.grad(output.flatten().norm(), weights)
            for total, square, grad in zip(*expected, grads, strict=True):
                total.add_(grad)
                square.add_(grad.square())
    for index, name in enumerate(modules):
        assert torch.allclose(stats[name]["sum"], expected[0][index], atol=1e-5), name
        assert torch.allclose(stats[name]["square"], expected[1][index], rtol=1e-4, atol=1e-7), name


def test_layers_fed_one_tensor_share_input_statistics_counted_once():
    model = tiny_llama()
    blocks = get_adapter(model).blocks(model)
    modules = {name: m for name, m in find_target_modules(model).items() if ".layers.0." in name}
    batches = calibration(model, count=2)
    hidden, calls = capture_block_inputs(model, blocks, batches)
    stats, _ = _gather(blocks[0], modules, calls[0], hidden, {"inputs", "hessian"})
    prefix = "model.layers.0."
    attention = [stats[prefix + f"self_attn.{p}_proj"] for p in "qkv"]
    assert all(entry["hessian"] is attention[0]["hessian"] for entry in attention)
    assert stats[prefix + "mlp.gate_proj"]["hessian"] is stats[prefix + "mlp.up_proj"]["hessian"]
    assert stats[prefix + "self_attn.o_proj"]["hessian"] is not attention[0]["hessian"]
    inputs = []  # the reference: q_proj's inputs recorded alone
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    rows = torch.cat(inputs)
    torch.testing.assert_close(
        attention[0]["hessian"], 2 * rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(attention[0]["inputs"], rows.square().sum(dim=0), rtol=1e-4, atol=1e-5)


def test_outlier_ratio_and_owl_sparsities():
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 97.0])], threshold=2.0) == 0.25
    sparsities = owl_sparsities([0.02, 0.01, 0.05, 0.03], 0.7)
    assert sum(sparsities) / 4 == pytest.approx(0.7)
    assert sorted(range(4), key=sparsities.__getitem__) == [2, 3, 0, 1]  # more outliers, fewer pruned
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert owl_sparsities([0.01, 0.01], 0.5) == [0.5, 0.5]
    near_one = owl_sparsities([0.0, 1.0], 0.95)
    assert max(near_one) < 1.0 and sum(near_one) / 2 == pytest.approx(0.95)


def test_owl_gives_each_block_the_sparsity_of_its_dense_outliers():
    model = tiny_llama()
    batches = calibration(model, count=2)
    modules = find_target_modules(model)
    inputs = {name: torch.zeros(m.in_features) for name, m in modules.items()}  # the reference: one pass

    def record(name, _module, args):
        inputs[name].add_(args[0].detach().square().flatten(0, -2).sum(0))

    handles = [m.register_forward_pre_hook(functools.partial(record, name)) for name, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    for handle in handles:
        handle.remove()
    ratios = [
        outlier_ratio([m.weight.abs() * inputs[n].sqrt() for n, m in modules.items() if f".layers.{i}." in n])
        for i in range(model.config.num_hidden_layers)
    ]
    expected = owl_sparsities(ratios, 0.5)
    assert len(set(expected)) == len(expected)
    masks = prune_weights(
        model, batches, 0.5, scope="per_row", method="wanda", allocation="owl", show_progress=False
    )
    for name, keep in masks.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        pruned = keep.shape[1] - keep.sum(dim=1)
        assert bool((pruned == round(expected[layer] * keep.shape[1])).all()), name


def output_error(model, dense, batches) -> float:
    return sum(float((logits(model, b) - logits(dense, b)).square().mean()) for b in batches) / len(batches)


@pytest.mark.parametrize("reconstruction", ["least_squares", "adam", "least_squares_adam"])
def test_reconstruction_brings_the_outputs_back_and_keeps_the_masks(reconstruction):
    dense, plain, model = tiny_llama(), tiny_llama(), tiny_llama()
    batches = calibration(model, count=4)
    options = {"method": "wanda", "scope": "per_row", "show_progress": False}
    targets = find_target_modules(model)
    prune_blockwise(plain, batches, 0.6, find_target_modules(plain), **options)
    # The tiny model's weights are drawn with std 0.3: Adam's steps are ten times the default's.
    masks = prune_blockwise(
        model, batches, 0.6, targets, reconstruction=reconstruction, adam_lr=1e-3, **options
    )
    # On the calibration text, what the update fits (held-out text: benchmarks/llm_blockwise.py).
    assert output_error(model, dense, batches) < 0.9 * output_error(plain, dense, batches)
    assert all(bool((model.get_parameter(n)[~k] == 0).all()) for n, k in masks.items())
    assert get_masks(model).keys() == masks.keys()


def test_blockwise_keeps_masks_already_on_the_model():
    model = tiny_llama()
    first = prune_weights(model, None, 0.3, method="magnitude", scope="per_row", show_progress=False)
    again = prune_weights(
        model, calibration(model), 0.5, method="sparsegpt", scope="per_row", show_progress=False
    )
    assert all(bool((again[name] <= first[name]).all()) for name in first)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"method": "sparsegpt", "scope": "global"}, "'global' cannot be used layer by layer"),
        ({"method": "sparsegpt", "scope": "per_layer"}, "takes scope 'per_row' or 'per_tensor'"),
        (
            {"method": "wanda", "reconstruction": "adam", "batches": None},
            "runs block by block on calibration",
        ),
        ({"method": "wanda", "reconstruction": "lsq"}, "`reconstruction` must be one of"),
        ({"method": "wanda", "allocation": "outliers"}, "`allocation` must be one of"),
        (
            {"method": "wanda", "allocation": "owl", "pattern": "2:4"},
            "allocation='owl' spreads an unstructured",
        ),
    ],
)
def test_prune_weights_bad_reconstruction_arguments(arguments, message):
    model = tiny_llama()
    batches = arguments.pop("batches", calibration(model))
    with pytest.raises(ValueError, match=message):
        prune_weights(model, batches, 0.5, show_progress=False, **arguments)


def test_reconstruction_needs_a_registered_family():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="needs a model of a registered family"):
        prune_weights(model, [{"x": torch.ones(1, 8)}], 0.5, method="sparsegpt")


@pytest.mark.parametrize(
    ("method", "reconstruction"), [("sparsegpt", "none"), ("wanda", "least_squares_adam")]
)
def test_pruning_trainer_prunes_block_by_block_and_the_saved_model_reloads(method, reconstruction, tmp_path):
    model = tiny_llama().train()
    trainer = PruningTrainer(
        model=model,
        args=quiet_cpu_args(tmp_path / "out"),
        train_dataset=tiny_dataset(causal=True),
        pruning_args=PruningArguments(
            weight_sparsity=0.5,
            weight_importance=method,
            weight_reconstruction=reconstruction,
            sparsity_scope="per_row",
            importance_batches=2,
        ),
    )
    trainer.train()
    trainer.save_model()
    again = load_pruned(tmp_path / "out")
    assert get_masks(again).keys() == {f"{name}.weight" for name in find_target_modules(model)}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert all(float((~keep).float().mean()) >= 0.5 for keep in get_masks(again).values())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weight_importance": "sparsegpt", "sparsity_scope": "global"}, "sparsegpt` scores each layer"),
        ({"weight_reconstruction": "adam", "sparsity_scope": "global"}, "reconstruction adam` scores each"),
        ({"weight_importance": "sparsegpt", "sparsity_scope": "per_layer"}, "per_row or per_tensor"),
        ({"weight_reconstruction": "lsq"}, "`--weight_reconstruction` must be one of none, least_squares"),
        ({"weight_sparsity_allocation": "owl", "sparsity_scope": "global"}, "allocation owl` scores each"),
        ({"weight_sparsity_allocation": "owl", "sparsity_pattern": "2:4"}, "2:4` fixes it in every block"),
    ],
)
def test_pruning_arguments_check_block_by_block_options(arguments, message):
    with pytest.raises(ValueError, match=message):
        PruningArguments(weight_sparsity=0.5, **arguments)


@pytest.mark.parametrize(
    "arguments", [{"weight_reconstruction": "adam"}, {"weight_sparsity_allocation": "owl"}], ids=str
)
def test_pruning_arguments_warn_that_block_options_without_weight_pruning_are_ignored(arguments):
    flag, value = next(iter(arguments.items()))
    with pytest.warns(UserWarning, match=f"`--{flag} {value}` shapes weight pruning, .* it is ignored"):
        PruningArguments(prune_heads_per_layer=1, **arguments)
