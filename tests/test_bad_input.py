"""Input that cannot do what it asks: a warning that says what happens instead, or a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

from hf_gradprune import (
    PruningArguments,
    PruningRecord,
    PruningTrainer,
    compute_head_importance,
    load_pruned,
    prune_layers_by_importance,
    prune_to_flops,
    prune_units,
    prune_weights,
)
from hf_gradprune.core.masks import compute_sparsity, get_masks

from .helpers import build_tiny, tiny_batch, tiny_dataset


def trainer_for(
    tmp_path, pruning: PruningArguments, model=None, rows: int = 64, **overrides
) -> PruningTrainer:
    args = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        **overrides,
    }
    return PruningTrainer(
        model=(model or build_tiny("bert")).train(),
        args=TrainingArguments(**args),
        train_dataset=tiny_dataset(rows=rows),
        pruning_args=pruning,
    )


def test_more_importance_batches_than_the_data_has_warns_and_uses_what_there_is(tmp_path):
    trainer = trainer_for(tmp_path, PruningArguments(prune_heads_per_layer=1, importance_batches=50), rows=24)
    with pytest.warns(UserWarning, match=r"`--importance_batches` is 50 but the training data gives 3 batch"):
        trainer.train()
    assert all(len(heads) == 1 for heads in trainer.model.config.hf_gradprune["pruned_heads"].values())


def test_prune_steps_past_the_end_of_training_warn_at_train_begin(tmp_path):
    trainer = trainer_for(tmp_path, PruningArguments(prune_heads_per_layer=1, prune_steps="2,9"))
    with pytest.warns(
        UserWarning, match=r"`--prune_steps` \[9\] are at or past the end of training \(max_steps=4\)"
    ):
        trainer.train()


def test_a_sparsity_ramp_ending_after_training_warns_with_the_sparsity_reached(tmp_path):
    pruning = PruningArguments(
        weight_sparsity=0.8,
        sparsity_schedule="linear",
        sparsity_schedule_end=8,
        sparsity_schedule_frequency=2,
        importance_batches=1,
    )
    trainer = trainer_for(tmp_path, pruning)
    with pytest.warns(UserWarning, match=r"the weights end at sparsity 0.2, not the `--weight_sparsity` 0.8"):
        trainer.train()
    assert compute_sparsity(trainer.model)["overall"] == pytest.approx(0.2, abs=0.01)


def test_pruning_an_already_pruned_model_says_how_the_arguments_apply(tmp_path):
    model = build_tiny("bert")
    prune_units(model, {"heads": {0: [0]}, "ffn": {layer: list(range(30)) for layer in range(3)}})
    trainer = trainer_for(
        tmp_path, PruningArguments(target_flops_ratio=0.9, importance_batches=1), model=model
    )
    with pytest.warns(UserWarning, match=r"already pruned \(heads: 1 removed, ffn: 90 removed\).*no head or"):
        trainer.train()


def test_structural_pruning_of_layers_that_share_weights_is_an_error():
    model = build_tiny("bert")
    model.bert.encoder.layer[2] = model.bert.encoder.layer[1]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"Layers 1 and 2 share the weights of 'attention.self.query'"):
        prune_units(model, {"heads": {0: [1], 1: [0]}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing cut


def test_fp16_on_cpu_trains_with_exact_masks(tmp_path):
    trainer = trainer_for(tmp_path, PruningArguments(weight_sparsity=0.5, importance_batches=1), fp16=True)
    trainer.train()
    masks = get_masks(trainer.model)
    assert masks and compute_sparsity(trainer.model, masks)["overall"] == pytest.approx(0.5, abs=1e-3)
    for name, mask in masks.items():
        assert torch.count_nonzero(trainer.model.get_parameter(name)[~mask]) == 0


def test_deepspeed_is_refused_with_the_reason():
    # TrainingArguments(deepspeed=...) needs the deepspeed package, not installed here: the refusal that
    # PruningTrainer and the callback's on_init_end make is checked directly. FSDP: test_distributed.py.
    from hf_gradprune.training.run_checks import refuse_sharded_training

    args = PruningArguments(weight_sparsity=0.5)
    refuse_sharded_training(args, None, deepspeed=False)
    refuse_sharded_training(args, 2, deepspeed=False)
    with pytest.raises(
        ValueError, match=r"does not support DeepSpeed training: .* Train with FSDP2 .* or DDP"
    ):
        refuse_sharded_training(args, None, deepspeed=True)
    with pytest.raises(ValueError, match=r"supports FSDP2 only, got fsdp_version=1: .*'fsdp_version': 2"):
        refuse_sharded_training(args, 1, deepspeed=False)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"weight_sparsity": 0.5, "scoring_passes": 3}, "--scoring_passes 3"),
        ({"prune_heads_per_layer": 1, "prune_steps": "0,4"}, "heads, FFN neurons or layers after step 0"),
        ({"weight_sparsity": 0.5, "export_vanilla": True}, "--export_vanilla"),
        ({"weight_sparsity": 0.5, "distill_alpha": 0.5}, "--distill_alpha"),
        ({"weight_sparsity": 0.5, "weight_importance": "sparsegpt"}, "--weight_importance sparsegpt"),
        ({"weight_sparsity": 0.5, "weight_reconstruction": "adam"}, "--weight_reconstruction adam"),
    ],
)
def test_fsdp2_refuses_what_reads_whole_parameters_naming_the_flag(flags, named):
    from hf_gradprune.training.run_checks import refuse_sharded_training

    args = PruningArguments(**flags)
    refuse_sharded_training(args, None, deepspeed=False)
    # PruningTrainer cuts structures at step 0 before the model is sharded: allowed, mask tuning too.
    step0 = PruningArguments(target_flops_ratio=0.5, mask_tuning=True, weight_sparsity=0.5, prune_steps="0")
    refuse_sharded_training(step0, 2, deepspeed=False)
    with pytest.raises(ValueError, match=r"Under FSDP2 hf_gradprune prunes weights in one shot") as error:
        refuse_sharded_training(args, 2, deepspeed=False)
    assert f"not yet {named}" in str(error.value) and "docs/scaling.md" in str(error.value)


def test_the_hub_token_reaches_no_file_log_or_card(tmp_path, capsys, caplog):
    secret = "hf_NotARealTokenButSecret123"
    trainer = trainer_for(
        tmp_path,
        PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.5, importance_batches=1),
        hub_token=secret,
        report_to=["tensorboard"],
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    trainer.save_model()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any("events.out" in p.name for p in files)
    leaked = [p.relative_to(tmp_path).as_posix() for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    assert secret not in repr(trainer.state.log_history)


# --- a diverged model, and folders that hold no model ---


def _diverged(model_type: str = "bert"):
    model = build_tiny(model_type)
    with torch.no_grad():
        model.get_parameter(DIVERGED)[0, 0] = float("nan")
    return model


DIVERGED = "bert.encoder.layer.1.attention.self.value.weight"


@pytest.mark.parametrize(
    "prune",
    [
        lambda model, batch: compute_head_importance(model, [batch], show_progress=False),
        lambda model, batch: prune_weights(model, [batch], 0.5, method="taylor", show_progress=False),
        lambda model, batch: prune_weights(model, None, 0.5, method="magnitude", show_progress=False),
        lambda model, batch: prune_weights(
            model, [batch], 0.5, method="wanda", sequential=True, show_progress=False
        ),
        lambda model, batch: prune_to_flops(model, [batch], 0.5, seq_len=8, rounds=1, show_progress=False),
        lambda model, batch: prune_layers_by_importance(model, [batch], 1, show_progress=False),
    ],
    ids=["head_importance", "taylor", "magnitude", "wanda_blockwise", "flops", "layers"],
)
def test_a_diverged_model_is_refused_naming_the_parameter_and_left_as_it_was(prune):
    model = _diverged()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"Parameter '{DIVERGED}' has 1 of 1024 values that are NaN"):
        prune(model, tiny_batch(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and not get_masks(model)
    assert all(torch.equal(after[k].nan_to_num(7.0), v.nan_to_num(7.0)) for k, v in before.items())


def test_trainer_refuses_to_prune_a_diverged_model_at_its_pruning_step(tmp_path):
    trainer = PruningTrainer(
        model=_diverged().train(),
        args=TrainingArguments(str(tmp_path), max_steps=2, use_cpu=True, report_to=[], disable_tqdm=True),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(weight_sparsity=0.5, weight_importance="obd", importance_batches=1),
    )
    with pytest.raises(ValueError, match="the model diverged"):
        trainer.train()
    assert not get_masks(trainer.model)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({}, r"holds no saved model: there is no config.json \(it is empty\)"),
        ({"pruning_masks.safetensors": b""}, r"it holds only weight masks \(pruning_masks.safetensors\)"),
        ({"notes.txt": b"x", "model.safetensors": b""}, r"it holds \['model.safetensors', 'notes.txt'\]"),
    ],
)
def test_load_pruned_on_a_folder_without_a_model_says_what_it_holds(tmp_path, files, match):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=r"`path_or_repo_id` .*" + match):
        load_pruned(tmp_path)


# Found by tests/test_properties.py with more examples than make test runs.


def test_a_list_flag_given_a_bool_names_the_flag():
    with pytest.raises(TypeError, match="`--prune_target_modules` must be a list of str or None, got True"):
        PruningArguments(prune_target_modules=True)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_an_n_m_pattern_that_does_not_divide_a_layer_is_refused_before_any_block_changes(method):
    model = build_tiny("llama")  # FFN of 37 neurons: down_proj has 37 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`model\.layers\.0\.mlp\.down_proj\.weight` has 37 inputs.*M=4"):
        prune_weights(model, [tiny_batch(model)], None, method, pattern="2:4", sequential=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and not get_masks(model)


def test_an_unknown_weight_method_is_refused_by_name():
    model = build_tiny("bert")
    with pytest.raises(ValueError, match=r"`method` must be one of .*'obd'.*'sparsegpt', got 'bogus'"):
        prune_weights(model, [tiny_batch(model)], 0.5, "bogus")


def test_an_unreachable_flops_target_is_refused_before_any_round_cuts():
    model = build_tiny("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`target_ratio` 0\.01 cannot be reached: Cannot remove"):
        prune_to_flops(
            model,
            [tiny_batch(model)],
            0.01,
            seq_len=8,
            min_heads_per_layer=2,
            layers=True,
            show_progress=False,
        )
    assert model.state_dict().keys() == before.keys()  # no layer removed by a first round
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_no_heads_kept_needs_allow_empty():
    model = build_tiny("bert")
    with pytest.raises(
        ValueError, match=r"`min_heads_per_layer` must be >= 1 \(>= 0 with `allow_empty=True`\)"
    ):
        prune_to_flops(model, [tiny_batch(model)], 0.5, seq_len=8, min_heads_per_layer=0, show_progress=False)


def test_an_unreachable_flops_flag_is_refused_at_the_first_cut(tmp_path):
    pruning = PruningArguments(target_flops_ratio=0.01, flops_seq_len=8, prune_flops_structures="heads,ffn")
    trainer = trainer_for(tmp_path, pruning)
    with pytest.raises(ValueError, match=r"`--target_flops_ratio` 0\.01 cannot be reached"):
        trainer.train()
    assert PruningRecord.from_config(trainer.model.config).is_empty()
