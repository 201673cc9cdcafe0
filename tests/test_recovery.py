"""Recovery in PruningTrainer: distillation from a frozen teacher (by default the model before its first cut),
its loss and logs, resume, and what a plain Trainer with the callback refuses."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from transformers import Trainer

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.core.masks import apply_masks, is_masked
from hf_gradprune.structured.mask_tuning import TOP_K
from hf_gradprune.structured.surgery import prune_layers
from hf_gradprune.training.distillation import Distiller, frozen_copy, output_divergence

from .helpers import build_tiny, quiet_cpu_args, tiny_batch, tiny_dataset

FAMILIES = ("bert", "distilbert", "gpt2", "llama", "qwen2")


def _run(tmp_path, model_type: str, resume: bool = False, rows: int = 48, **pruning) -> PruningTrainer:
    causal = model_type in ("gpt2", "llama", "qwen2")
    args = quiet_cpu_args(
        tmp_path / "out",
        max_steps=6,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,
        seed=0,
        data_seed=0,
    )
    trainer = PruningTrainer(
        model=build_tiny(model_type).train(),
        args=args,
        train_dataset=tiny_dataset(rows=rows, causal=causal),
        pruning_args=PruningArguments(**{"distill_alpha": 0.5, "importance_batches": 2, **pruning}),
    )
    trainer.pruning_callback.show_progress = False
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3") if resume else None)
    return trainer


@pytest.mark.parametrize("model_type", FAMILIES)
def test_trainer_distils_from_the_model_before_its_cut_with_a_frozen_teacher(tmp_path, model_type):
    dense = build_tiny(model_type)
    trainer = _run(tmp_path, model_type, prune_heads_per_layer=1, distill_hidden_states=True)
    teacher = trainer.distiller.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, dense.state_dict()[k]) for k, p in teacher.state_dict().items())
    assert PruningRecord.from_config(
        trainer.model.config
    ).pruned_heads  # the student was cut, not the teacher
    logs = [h for h in trainer.state.log_history if "distill/kl" in h]
    assert len(logs) == 6 and all(h["distill/kl"] >= 0 and "distill/hidden" in h for h in logs)
    # The logged loss is the blend of its parts.
    first = logs[0]
    blended = 0.5 * first["distill/task"] + 0.5 * (first["distill/kl"] + first["distill/hidden"])
    assert first["loss"] == pytest.approx(blended, rel=1e-3)


def test_trainer_distillation_lowers_the_divergence_from_the_teacher(tmp_path):
    """One batch of 8 at every step, no dropout: the student's divergence from the teacher on it falls."""
    trainer = _run(tmp_path, "llama", rows=8, prune_heads_per_layer=1, distill_alpha=1.0)
    kl = [h["distill/kl"] for h in trainer.state.log_history if "distill/kl" in h]
    assert all(later < earlier for earlier, later in itertools.pairwise(kl)) and kl[-1] < 0.75 * kl[0]


def test_trainer_distillation_resumes_to_the_same_model(tmp_path):
    full = _run(tmp_path, "llama", prune_heads_per_layer=1, prune_steps="0,4").model
    assert (tmp_path / "out" / "distillation_teacher" / "config.json").is_file()
    resumed = _run(tmp_path, "llama", resume=True, prune_heads_per_layer=1, prune_steps="0,4").model
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)


def test_trainer_distillation_resume_without_the_saved_teacher_says_what_is_missing(tmp_path):
    _run(tmp_path, "bert", prune_heads_per_layer=1)
    shutil.rmtree(tmp_path / "out" / "distillation_teacher")
    with pytest.raises(ValueError, match=r"needs its teacher, saved at .*distillation_teacher.*not there"):
        _run(tmp_path, "bert", resume=True, prune_heads_per_layer=1)


def test_plain_trainer_with_the_callback_refuses_distillation(tmp_path):
    callback = GradientPruningCallback(PruningArguments(prune_heads_per_layer=1, distill_alpha=0.5))
    with pytest.raises(ValueError, match=r"`--distill_alpha 0.5` adds a distillation term.*PruningTrainer"):
        Trainer(model=build_tiny("bert"), args=quiet_cpu_args(tmp_path), callbacks=[callback])


def test_hidden_states_pair_each_kept_layer_with_the_one_it_was():
    """A block that adds nothing, removed: every kept layer's output equals the teacher's layer it was."""
    teacher = build_tiny("llama")
    block = teacher.model.layers[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    student = frozen_copy(teacher)
    prune_layers(student, [1])
    distiller = Distiller(teacher, alpha=1.0, hidden_states=True)
    inputs = distiller.inputs(tiny_batch(student))
    outputs = student(**inputs)
    _, parts = distiller.loss(student, outputs["loss"], outputs, inputs)
    assert parts.hidden == pytest.approx(0.0, abs=1e-10) and parts.kl == pytest.approx(0.0, abs=1e-6)
    # Paired by position instead (student layer 1 against teacher layer 1), they differ.
    plain = build_tiny("llama")
    prune_layers(plain, [2])  # layer 1 kept: positions and layers agree, outputs do not
    _, other = Distiller(teacher, 1.0, hidden_states=True).loss(
        plain, outputs["loss"], plain(**inputs), inputs
    )
    assert other.hidden > 1e-6


def test_output_divergence_over_the_top_tokens_is_at_most_the_full_kl():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 4 * TOP_K, generator=generator).unbind()
    reduced = output_divergence(student, teacher, temperature=1.0)
    full = output_divergence(student, teacher, temperature=1.0, top_k=4 * TOP_K)
    assert 0 < reduced <= full
    with pytest.raises(ValueError, match="distillation needs the same outputs"):
        output_divergence(student, teacher[:, :-1])


def test_frozen_copy_of_a_masked_model_keeps_its_zeros_without_the_hooks():
    model = build_tiny("bert")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    mask = torch.ones_like(model.get_parameter(name), dtype=torch.bool)
    mask[:, ::2] = False
    apply_masks(model, {name: mask})
    teacher = frozen_copy(model)
    assert is_masked(model) and not is_masked(teacher)
    assert torch.equal(teacher.get_parameter(name) == 0, ~mask)


def test_pruning_arguments_distillation_checks():
    with pytest.raises(ValueError, match=r"`--distill_alpha` must be in \[0, 1\]"):
        PruningArguments(prune_heads_per_layer=1, distill_alpha=1.5)
    with pytest.raises(ValueError, match="`--distill_temperature` must be > 0"):
        PruningArguments(prune_heads_per_layer=1, distill_alpha=0.5, distill_temperature=0.0)
    with pytest.warns(UserWarning, match="`--distill_hidden_states True` shapes distillation, which is off"):
        PruningArguments(prune_heads_per_layer=1, distill_hidden_states=True)
