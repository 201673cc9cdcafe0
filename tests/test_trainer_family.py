"""Pruning inside the Trainer family: trl's SFTTrainer (LoRA through ``peft_config`` too) and Seq2SeqTrainer,
with ``PruningMixin`` or ``GradientPruningCallback``."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)
from trl import SFTConfig, SFTTrainer

from hf_gradprune import (
    GradientPruningCallback,
    PruningArguments,
    PruningMixin,
    PruningRecord,
    load_pruned,
)
from hf_gradprune.core.masks import get_masks
from hf_gradprune.training.distillation import frozen_copy
from hf_gradprune.training.lora import merge_and_unload

from .sft_worker import PruningSFTTrainer, reviews, sft_tokenizer, tiny_llama

WORKER = Path(__file__).with_name("sft_worker.py")


class PruningSeq2SeqTrainer(PruningMixin, Seq2SeqTrainer):
    """The same for encoder-decoder models."""


@pytest.fixture(scope="module")
def tokenizer():
    return sft_tokenizer()


def sft_args(tmp_path, **overrides) -> SFTConfig:
    settings = {
        "max_steps": 4, "per_device_train_batch_size": 8, "report_to": [], "use_cpu": True,
        "save_strategy": "no", "disable_tqdm": True, "max_length": 32, "logging_steps": 1, "seed": 0,
    }  # fmt: skip
    return SFTConfig(output_dir=str(tmp_path / "out"), **{**settings, **overrides})


def sft_trainer(
    tmp_path, tokenizer, trainer_class: type = PruningSFTTrainer, args=None, **kwargs
) -> SFTTrainer:
    """A ``trainer_class`` on a fresh tiny Llama and the review texts; ``kwargs`` add to or replace those."""
    common = {"model": tiny_llama(tokenizer), "train_dataset": reviews(), "processing_class": tokenizer}
    return trainer_class(args=args or sft_args(tmp_path), **{**common, **kwargs})


def test_sft_distillation_trains_on_a_kl_from_a_teacher_that_is_not_the_student(tmp_path, tokenizer):
    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        pruning_args=PruningArguments(prune_heads_per_layer=1, distill_alpha=1.0, importance_batches=1),
    )
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "distill/kl" in entry]
    assert len(steps) == 4 and all(entry["distill/kl"] > 0 for entry in steps)
    # With alpha 1 the loss is the KL alone: a gradient means the KL reaches the student's weights.
    assert all(entry["grad_norm"] > 0 for entry in steps)
    batch = {"input_ids": tokenizer(["the film was good"], return_tensors="pt")["input_ids"]}
    student, teacher = trainer.model.eval(), trainer.distiller.teacher
    assert teacher.model.layers[0].self_attn.q_proj.out_features == 32  # the model before the cut
    assert student.model.layers[0].self_attn.q_proj.out_features == 16  # one key/value group of two heads
    assert not torch.allclose(student(**batch).logits, teacher(**batch).logits)


def test_copies_of_a_model_trl_patched_run_their_own_weights(tmp_path, tokenizer):
    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        trainer_class=SFTTrainer,
    )
    assert "forward" in vars(trainer.model)  # trl's fused LM head, patched on the instance
    copy = frozen_copy(trainer.model)
    with torch.no_grad():
        copy.lm_head.weight.zero_()
    batch = {"input_ids": tokenizer(["a dull film"], return_tensors="pt")["input_ids"]}
    assert bool((copy(**batch).logits == 0).all())
    assert bool(trainer.model.eval()(**batch).logits.abs().sum() > 0)


@pytest.mark.parametrize("how", ["mixin", "callback"])
def test_sft_two_four_masks_hold_and_the_saved_model_reloads_exactly(tmp_path, tokenizer, how):
    pruning = PruningArguments(weight_sparsity=0.5, sparsity_pattern="2:4", importance_batches=1)
    if how == "mixin":
        trainer = sft_trainer(tmp_path, tokenizer, pruning_args=pruning)
    else:
        trainer = sft_trainer(
            tmp_path, tokenizer, trainer_class=SFTTrainer, callbacks=[GradientPruningCallback(pruning)]
        )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    masks = get_masks(trainer.model)
    assert len(masks) == 14  # 7 linears in each of 2 blocks
    for name, mask in masks.items():
        weight = trainer.model.get_parameter(name)
        assert bool((weight[~mask] == 0).all())
        assert bool((mask.reshape(-1, 4).sum(-1) == 2).all())  # 2 of every 4 inputs kept
    again = load_pruned(tmp_path / "saved")
    assert all(torch.equal(masks[k], get_masks(again)[k]) for k in masks)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trainer.model.state_dict().items())


def test_sft_callback_cuts_heads_under_a_flops_budget(tmp_path, tokenizer):
    callback = GradientPruningCallback(
        PruningArguments(
            target_flops_ratio=0.6, prune_rounds=2, importance_batches=1, prune_ffn_multiple_of=1
        )
    )
    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        trainer_class=SFTTrainer,
        callbacks=[callback],
    )
    trainer.train()
    record = PruningRecord.from_config(trainer.model.config)
    assert not record.is_empty()
    assert next(e for e in trainer.state.log_history if "prune/flops_ratio" in e)["prune/flops_ratio"] <= 0.61


def test_sft_lora_weight_pruning_keeps_the_base_zeros_through_the_merge(tmp_path, tokenizer):
    from peft import LoraConfig

    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        pruning_args=PruningArguments(weight_sparsity=0.5, importance_batches=1),
    )
    trainer.train()
    masks = get_masks(trainer.model)
    assert any("q_proj.base_layer.weight" in name for name in masks)  # the base layer, not its adapters
    assert not any("lora_" in name for name in masks)
    merged = merge_and_unload(trainer.model)
    merged_masks = get_masks(merged)
    assert len(merged_masks) == len(masks) == 14
    for name, mask in merged_masks.items():
        assert bool((merged.get_parameter(name)[~mask] == 0).all())


def test_sft_lora_refuses_structures_saying_what_to_do(tmp_path, tokenizer):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"not cut under LoRA \(`peft_config`\).*Cut first.*then train LoRA"):
        sft_trainer(
            tmp_path,
            tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0),
            pruning_args=PruningArguments(prune_heads_per_layer=1),
        )


@pytest.mark.parametrize("lora", [False, True])
def test_sft_mixin_resumes_to_the_uninterrupted_run(tmp_path, tokenizer, lora):
    from peft import LoraConfig

    pruning = PruningArguments(
        prune_heads_per_layer=None if lora else 1, weight_sparsity=0.5, prune_steps="2", importance_batches=1
    )
    # Under LoRA a checkpoint holds the adapter alone (no model.safetensors): the Trainer's to load.
    peft = (
        {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)}
        if lora
        else {}
    )

    def run(folder: str, resume: bool = False) -> PruningSFTTrainer:
        args = sft_args(tmp_path / folder, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = sft_trainer(tmp_path, tokenizer, args=args, pruning_args=pruning, **peft)
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer

    full = run("full")
    shutil.copytree(tmp_path / "full" / "out" / "checkpoint-3", tmp_path / "run" / "out" / "checkpoint-3")
    again = run("run", resume=True)
    masks = get_masks(full.model)
    assert len(masks) == 14 and masks.keys() == get_masks(again.model).keys()
    assert all(torch.equal(masks[k], get_masks(again.model)[k]) for k in masks)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value, atol=1e-6, rtol=0)


def run_sft_worker(out_dir: Path, mode: str, trainer: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(out_dir), mode, trainer],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("trainer", ["mixin", "callback"])
def test_sft_run_killed_while_checkpointing_resumes_to_the_uninterrupted_run(tmp_path, trainer):
    """A head cut, a weight ramp (and distillation with the mixin) under SFTTrainer, killed with SIGKILL while
    writing checkpoint-6: resumed from checkpoint-4, it ends where the uninterrupted run ends."""
    full = run_sft_worker(tmp_path / "full", "full", trainer)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = run_sft_worker(tmp_path / "run", "killed", trainer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (tmp_path / "run" / "out" / "checkpoint-6" / "trainer_state.json").exists()
    if trainer == "callback":  # a plain trl run would take the cut-short checkpoint: its user removes it
        shutil.rmtree(tmp_path / "run" / "out" / "checkpoint-6")
    resumed = run_sft_worker(tmp_path / "run", "resume", trainer)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, again = load_pruned(tmp_path / "full" / "final"), load_pruned(tmp_path / "run" / "final")
    heads = PruningRecord.from_config(expected.config).pruned_heads
    assert len(heads) == 2 and PruningRecord.from_config(again.config).pruned_heads == heads
    masks = get_masks(expected)
    assert len(masks) == 14 and masks.keys() == get_masks(again).keys()
    assert all(torch.equal(masks[k], get_masks(again)[k]) for k in masks)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=1e-6, rtol=0)


def test_sft_mixin_card_has_the_pruning_and_trls_tags(tmp_path, tokenizer):
    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        eval_dataset=reviews(16),
        pruning_args=PruningArguments(prune_heads_per_layer=1, importance_batches=1),
    )
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- trl\n" in card and "- sft\n" in card and "- pruning\n" in card
    assert "Attention heads removed:** 4 of 8" in card  # a key/value group of 2 heads in each layer


def seq2seq_data(rows: int = 32) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (rows, 8), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.flip(-1)[:, :5].tolist()})


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_mixin_prunes_and_passes_generation_arguments_through(tmp_path, family):
    torch.manual_seed(0)
    if family == "t5":
        config = T5Config(
            vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0
        )
        model = T5ForConditionalGeneration(config)
    else:
        config = BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        )  # fmt: skip
        model = BartForConditionalGeneration(config)
    args = Seq2SeqTrainingArguments(
        str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        predict_with_generate=True, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = PruningSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=seq2seq_data(),
        eval_dataset=seq2seq_data(8),
        pruning_args=PruningArguments(weight_sparsity=0.5, importance_batches=1),
    )
    trainer.train()
    short = trainer.evaluate(max_length=6, num_beams=2)
    assert "eval_loss" in short and trainer._gen_kwargs == {"max_length": 6, "num_beams": 2}  # passed through
    masks = get_masks(trainer.model)
    assert masks and all(bool((trainer.model.get_parameter(n)[~m] == 0).all()) for n, m in masks.items())
    assert trainer.eval_before is not None and trainer.eval_pruned is not None and trainer.eval_after == short


def test_mixin_after_the_trainer_is_refused_when_the_class_is_defined():
    with pytest.raises(
        TypeError, match=r"puts PruningMixin after SFTTrainer.*class Wrong\(PruningMixin, SFTTrainer\)"
    ):

        class Wrong(SFTTrainer, PruningMixin):
            pass


def test_sft_callback_tags_the_model_so_the_pushed_card_says_it_is_pruned(tmp_path, tokenizer):
    trainer = sft_trainer(
        tmp_path,
        tokenizer,
        trainer_class=SFTTrainer,
        callbacks=[GradientPruningCallback(PruningArguments(weight_sparsity=0.5, importance_batches=1))],
    )
    assert "pruning" not in trainer.model.model_tags
    trainer.train()
    # Trainer.push_to_hub merges the model's tags into the card it writes (trl's and the Trainer's alike).
    assert {"trl", "sft", "pruning", "hf-gradprune"} <= set(trainer.model.model_tags)
