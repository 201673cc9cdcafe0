"""Weight pruning on any nn.Module the Trainer trains: the CNN of the example, convolutions, plain outputs."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_gradprune import (
    GradientPruningCallback,
    PruningArguments,
    compute_weight_importance,
    compute_weight_masks,
    find_target_modules,
    save_pruned,
)
from hf_gradprune.core.adapters import weight_input_dims
from hf_gradprune.core.mask_files import load_masks
from hf_gradprune.core.masks import MASKS_FILENAME, apply_masks, get_masks
from hf_gradprune.testing import load_mnist_5k

from .helpers import run_fresh

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_classification_cnn.py"


def load_example():
    spec = importlib.util.spec_from_file_location("image_classification_cnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


SmallCNN = load_example().SmallCNN


@pytest.fixture(scope="module")
def digits():
    data = load_mnist_5k()
    return data["train"].select(range(192)), data["test"].select(range(64))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN()


def image_batches(count: int = 2, size: int = 8, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.rand(size, 1, 28, 28, generator=generator), "labels": torch.arange(size) % 10}
        for _ in range(count)
    ]


def test_cnn_default_targets_are_every_conv_and_linear_but_the_output_layer():
    assert list(find_target_modules(cnn())) == ["conv1", "conv2", "fc"]


def test_cnn_n_m_runs_along_input_channels_times_kernel():
    model = cnn()
    scores = compute_weight_importance(model, method="magnitude", target_modules=["conv2"])
    dims = weight_input_dims(model, ["conv2"])
    assert dims == {"conv2.weight": (1, 2, 3)}
    mask = compute_weight_masks(scores, None, pattern="2:4", input_dims=dims)["conv2.weight"]
    assert mask.shape == (32, 16, 3, 3)
    groups = mask.reshape(32, -1).reshape(32, -1, 4)  # 16 * 9 = 144 inputs per output channel
    assert (groups.sum(dim=-1) == 2).all()


def test_conv_n_m_that_does_not_divide_is_a_clear_error():
    model = cnn()  # conv1 has 1 * 3 * 3 = 9 inputs per output channel
    scores = compute_weight_importance(model, method="magnitude", target_modules=["conv1"])
    with pytest.raises(ValueError, match=r"`conv1.weight` has 9 inputs per output \(dims \(1, 2, 3\)\)"):
        compute_weight_masks(scores, None, pattern="2:4", input_dims=weight_input_dims(model, ["conv1"]))


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3), nn.Conv3d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2)])
def test_conv_wanda_scales_by_input_channel_norm(conv):
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))
    shape = (3, 4, *[5] * (conv.weight.dim() - 2))
    batch = torch.randn(shape)
    model(batch)  # materialise the lazy layer
    squares = batch.square().transpose(0, 1).reshape(4, -1).sum(dim=1)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return {"logits": self.body(x)}

    wrapped = Wrapped()
    (score,) = compute_weight_importance(
        wrapped, [{"x": batch}], method="wanda", target_modules=["body.0"], show_progress=False
    ).values()
    per_group = squares.sqrt().view(conv.groups, -1).repeat_interleave(6 // conv.groups, dim=0)
    expected = conv.weight.detach().abs() * per_group.view(6, -1, *[1] * (conv.weight.dim() - 2))
    torch.testing.assert_close(score, expected)


def test_model_returning_a_tuple_gives_its_loss_as_the_trainer_reads_it():
    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x, labels):
            logits = self.out(self.hidden(x))
            return nn.functional.cross_entropy(logits, labels), logits

    torch.manual_seed(0)
    model = TupleModel()
    batch = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 0, 1, 1])}
    (score,) = compute_weight_importance(model, [batch], method="gradient", show_progress=False).values()
    loss, _ = model(**batch)
    loss.backward()
    torch.testing.assert_close(score, model.hidden.weight.grad.abs())


def test_model_without_a_loss_is_a_clear_error():
    with pytest.raises(ValueError, match=r"returned no loss.*outputs\['loss'\]"):
        compute_weight_importance(cnn(), [{"pixel_values": torch.rand(2, 1, 28, 28)}], method="taylor")


def args(folder: Path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(folder),
        "max_steps": 6,
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


def test_head_pruning_on_a_model_without_adapter_is_a_clear_error(digits, tmp_path):
    callback = GradientPruningCallback(PruningArguments(prune_heads_per_layer=1))
    trainer = Trainer(model=cnn(), args=args(tmp_path), train_dataset=digits[0], callbacks=[callback])
    with pytest.raises(ValueError, match=r"model_type None for head and neuron pruning.*register_adapter"):
        trainer.train()


RELOAD = """
import importlib.util, json, sys, torch
from hf_gradprune import load_pruned
from hf_gradprune.core.masks import get_masks
spec = importlib.util.spec_from_file_location("image_classification_cnn", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
model = load_pruned(sys.argv[2], model=example.SmallCNN())
batch = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save({"logits": model(**batch)["logits"], "masks": get_masks(model)}, sys.argv[4])
"""


@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "taylor", "combined", "fisher", "wanda"])
def test_cnn_in_plain_trainer_prunes_resumes_and_reloads_fresh_with_exact_masks(criterion, digits, tmp_path):
    train, _ = digits
    pruning = PruningArguments(
        weight_sparsity=0.7,
        weight_importance=criterion,
        sparsity_schedule="linear",
        sparsity_schedule_end=4,
        sparsity_schedule_frequency=2,
        importance_batches=2,
    )

    def run(resume: bool) -> nn.Module:
        trainer = Trainer(
            model=cnn(seed=1 if resume else 0),  # resumed: everything must come from the checkpoint
            args=args(tmp_path / "run", save_strategy="steps", save_steps=3),
            train_dataset=train,
            callbacks=[GradientPruningCallback(pruning, show_progress=False)],
        )
        # A plain Trainer resuming from its output_dir: the callback finds the checkpoint's pruning state.
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3") if resume else None)
        return trainer.model

    straight = run(resume=False)
    resumed = run(resume=True)
    masks = get_masks(resumed)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name, mask in get_masks(straight).items():
        assert torch.equal(masks[name], mask), name
        weight = resumed.get_parameter(name).detach()
        assert torch.count_nonzero(weight[~mask]) == 0 and (~mask).float().mean() == pytest.approx(
            0.7, abs=2e-3
        )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    checkpoint = load_masks(tmp_path / "run" / "checkpoint-3" / MASKS_FILENAME)
    assert set(checkpoint) == set(masks)

    folder = save_pruned(resumed, tmp_path / "saved")
    batch = {"pixel_values": train.with_format("torch")[:8]["pixel_values"]}
    torch.save(batch, tmp_path / "batch.pt")
    run_fresh(RELOAD, str(EXAMPLE), str(folder), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"))
    fresh = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(fresh["logits"], resumed.eval()(**batch)["logits"])
    assert fresh["masks"].keys() == masks.keys()
    assert all(torch.equal(fresh["masks"][name], mask) for name, mask in masks.items())
    assert json.loads((tmp_path / "run" / "checkpoint-3" / "pruning_state.json").read_text())[
        "weight_sparsity"
    ] == pytest.approx(0.35)


def test_sequential_pruning_scores_each_layer_on_the_layers_already_pruned():
    from hf_gradprune import prune_weights

    model = cnn()
    data = image_batches(count=2)
    sequential = copy.deepcopy(model)
    masks = prune_weights(
        sequential, data, 0.5, method="wanda", scope="per_row", sequential=True, show_progress=False
    )
    # By hand: conv1 from the dense model, then conv2 scored with conv1 masked, then fc with both.
    manual = copy.deepcopy(model)
    for name in ("conv1", "conv2", "fc"):
        scores = compute_weight_importance(
            manual, data, method="wanda", target_modules=[f"^{name}$"], show_progress=False
        )
        dims = weight_input_dims(manual, [f"^{name}$"])
        step = compute_weight_masks(scores, 0.5, scope="per_row", input_dims=dims)
        apply_masks(manual, step)
        assert torch.equal(masks[f"{name}.weight"], step[f"{name}.weight"]), name
    together = prune_weights(
        copy.deepcopy(model), data, 0.5, method="wanda", scope="per_row", show_progress=False
    )
    assert not torch.equal(together["fc.weight"], masks["fc.weight"])  # the order made a difference


def test_sequential_pruning_refuses_a_global_threshold():
    from hf_gradprune import prune_weights

    with pytest.raises(ValueError, match=r"`scope` 'global' cannot be used layer by layer"):
        prune_weights(cnn(), image_batches(), 0.5, method="wanda", scope="global", sequential=True)
