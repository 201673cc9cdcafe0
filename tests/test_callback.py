import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.core.mask_files import load_masks
from hf_gradprune.core.masks import MASKS_FILENAME, get_masks

from .helpers import RAMP_PRUNING, build_tiny, tiny_dataset


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 12,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-2,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


def test_callback_spreads_heads_over_prune_steps():
    callback = GradientPruningCallback(PruningArguments(prune_heads_per_layer=3, prune_steps="0,10"))
    assert [callback.plan.units_to_remove("heads", s, 12) for s in (0, 5, 10)] == [2, None, 1]


def test_callback_fraction_of_heads_spread_over_prune_steps():
    callback = GradientPruningCallback(PruningArguments(prune_heads_fraction=0.5, prune_steps="0,4"))
    assert [callback.plan.units_to_remove("heads", s, 12) for s in (0, 4)] == [3, 3]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({}, {0: 0.6, 2: None, 4: None}),
        (
            {"sparsity_schedule": "linear", "sparsity_schedule_end": 4, "sparsity_schedule_frequency": 2},
            {0: None, 1: None, 2: 0.3, 4: 0.6},
        ),
        (
            {"sparsity_schedule": "cubic", "sparsity_schedule_end": 4, "sparsity_schedule_frequency": 2},
            {0: None, 2: 0.6 * (1 - 0.5**3), 4: 0.6},
        ),
    ],
)
def test_callback_weight_schedule(schedule, expected):
    callback = GradientPruningCallback(PruningArguments(weight_sparsity=0.6, **schedule))
    got = {step: callback.plan.weight_sparsity_at(step) for step in expected}
    assert all(
        (got[s] is None) == (v is None) and (v is None or math.isclose(got[s], v))
        for s, v in expected.items()
    ), got


def test_callback_requires_pruning_arguments():
    with pytest.raises(TypeError, match="`pruning_args` must be a PruningArguments, got dict"):
        GradientPruningCallback({"weight_sparsity": 0.5})


def assert_masked_weights_zero(model, masks: dict) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_plain_trainer_masks_persist_through_adamw_clipping_accumulation_bf16(model_type, tmp_path):
    model = build_tiny(model_type).train()
    callback = GradientPruningCallback(
        PruningArguments(weight_sparsity=0.5, weight_importance="taylor", importance_batches=2),
        show_progress=False,
    )
    args = training_args(tmp_path, max_steps=20, gradient_accumulation_steps=2, bf16=True, learning_rate=0.5)
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_dataset(causal=model_type != "bert"), callbacks=[callback]
    )
    trainer.train()
    masks = get_masks(model)
    assert masks and all(int((~m).sum()) == m.numel() // 2 for m in masks.values())
    assert_masked_weights_zero(model, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        moments = trainer.optimizer.state[params[name]]
        assert torch.count_nonzero(moments["exp_avg"][~mask]) == 0
        assert torch.count_nonzero(params[name].detach()[mask]) > 0.9 * mask.sum()  # kept weights trained on


@pytest.mark.parametrize(("model_type", "removed"), [("bert", 1), ("gpt2", 1), ("llama", 2)])
def test_trainer_prunes_heads_mid_training_and_remaps_optimizer(model_type, removed, tmp_path):
    model = build_tiny(model_type).train()
    pruning = PruningArguments(
        prune_heads_per_layer=1, prune_steps="4", weight_sparsity=0.3, importance_batches=2
    )
    trainer = PruningTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=tiny_dataset(causal=model_type != "bert"),
        pruning_args=pruning,
    )
    trainer.pruning_callback.show_progress = False
    trainer.train()
    pruned = PruningRecord.from_config(model.config).pruned_heads
    assert sorted(pruned) == [0, 1, 2] and all(len(heads) == removed for heads in pruned.values())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    params = dict(model.named_parameters())
    for param in trainer.optimizer.state:
        assert trainer.optimizer.state[param]["exp_avg"].shape == param.shape
    for name, mask in get_masks(model).items():  # masks were cut with their weights and still hold
        assert mask.shape == params[name].shape and int((~mask).sum()) == round(0.3 * mask.numel())
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0


def test_trainer_logs_pruning_to_log_history(tmp_path):
    pruning = PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.5, importance_batches=1)
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=tiny_dataset(),
        pruning_args=pruning,
    )
    trainer.train()
    (entry,) = [h for h in trainer.state.log_history if "prune/sparsity" in h]
    # Pruned before step 1, logged with the Trainer's first log after it (beside the loss).
    assert entry["step"] == 1 and entry["prune/sparsity"] == 0.5 and "loss" in entry
    assert [entry[f"prune/heads_layer_{i}"] for i in range(3)] == [3, 3, 3]
    assert entry["prune/sparsity_layer_0"] == 0.5


def test_trainer_checkpoint_holds_masks_state_and_no_pickle(tmp_path):
    pruning = PruningArguments(weight_sparsity=0.5, importance_batches=1)
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=tiny_dataset(),
        pruning_args=pruning,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "training_args.json").is_file() and (checkpoint / "optimizer.safetensors").is_file()
    assert not [p.name for p in checkpoint.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert json.loads((checkpoint / "pruning_state.json").read_text())["weight_sparsity"] == 0.5
    masks, weights = load_masks(checkpoint / MASKS_FILENAME), load_file(checkpoint / "model.safetensors")
    assert set(weights) == set(build_tiny("bert").state_dict())  # the model's own keys, no *_mask/*_orig
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, f"dense checkpoint: {name}"


def final_state(tmp_path, resume: bool) -> tuple[dict, dict, dict]:
    pruning = PruningArguments(**RAMP_PRUNING)
    args = training_args(tmp_path, max_steps=12, save_strategy="steps", save_steps=4)
    torch.manual_seed(0)
    trainer = PruningTrainer(
        model=build_tiny("bert").train(), args=args, train_dataset=tiny_dataset(rows=96), pruning_args=pruning
    )
    trainer.pruning_callback.show_progress = False
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4") if resume else None)
    model = trainer.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return get_masks(model), PruningRecord.from_config(model.config).pruned_heads, state


def test_trainer_resume_reaches_the_same_final_masks(tmp_path):
    masks, heads, weights = final_state(tmp_path, resume=False)
    resumed_masks, resumed_heads, resumed_weights = final_state(tmp_path, resume=True)
    assert resumed_heads == heads and len(heads) == 3
    assert masks.keys() == resumed_masks.keys()
    assert all(torch.equal(masks[k], resumed_masks[k]) for k in masks)
    assert all(int((~m).sum()) == round(0.6 * m.numel()) for m in masks.values())
    for key, value in weights.items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-5, rtol=1e-4)


def test_trainer_logs_pruning_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruning = PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.5, importance_batches=1)
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=training_args(tmp_path, max_steps=2, report_to=["tensorboard"]),
        train_dataset=tiny_dataset(),
        pruning_args=pruning,
    )
    trainer.train()
    runs = tmp_path / "out" / "runs"
    (logged,) = [folder for folder in runs.iterdir() if folder.name != "pruning"]  # the Trainer's own writer
    scalars = EventAccumulator(str(logged)).Reload()
    assert {
        "train/prune/sparsity",
        "train/prune/sparsity_layer_2",
        "train/prune/heads_layer_0",
        "train/prune/ffn_layer_2",
        "train/prune/flops_ratio",
    } <= set(scalars.Tags()["scalars"])
    assert scalars.Scalars("train/prune/heads_layer_1")[0].value == 3
    assert scalars.Scalars("train/prune/sparsity")[0].value == pytest.approx(0.5)
    figures = EventAccumulator(str(runs / "pruning"), size_guidance={"images": 0}).Reload()
    assert "prune/head_importance" in figures.Tags()["images"]
