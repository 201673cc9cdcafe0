"""Worker of tests/test_trainer_family.py: pruning inside trl's ``SFTTrainer`` in a process of its own, so
that it can die for real.

Usage: ``python tests/sft_worker.py OUT_DIR MODE TRAINER`` with MODE ``full`` (the whole run), ``killed``
(killed with SIGKILL while it writes checkpoint-6) or ``resume`` (``resume_from_checkpoint=True``), and
TRAINER ``mixin`` (``PruningMixin`` + ``SFTTrainer``: one head per layer cut at step 2, a ramp to 60% zero
weights and distillation from the model before the cut) or ``callback`` (``SFTTrainer`` with
``GradientPruningCallback``, the same cuts without distillation). Every run saves the final model with
``save_pruned`` into ``OUT_DIR/final``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningMixin, save_pruned
from hf_gradprune.testing.shipped import minilm_path

KILL_AT_STEP = 6


class PruningSFTTrainer(PruningMixin, SFTTrainer):
    """What a trl user writes: one changed class line."""


def sft_tokenizer() -> PreTrainedTokenizerBase:
    """A real tokenizer (MiniLM's WordPiece), with an end-of-sequence token for SFT."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def reviews(rows: int = 64) -> Dataset:
    texts = [
        f"review {i}: the film was {'good' if i % 2 else 'dull'} and the cast {'shone' if i % 3 else 'tried'}"
        for i in range(rows)
    ]
    return Dataset.from_dict({"text": texts})


def main(out_dir: str, mode: str, trainer: str) -> None:
    tokenizer = sft_tokenizer()
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "out"), max_steps=8, per_device_train_batch_size=8, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True, max_length=32, seed=0,
        data_seed=0, learning_rate=1e-3,
    )  # fmt: skip
    pruning = PruningArguments(
        prune_heads_per_layer=1, prune_steps="2", importance_batches=1, weight_sparsity=0.6,
        sparsity_schedule="linear", sparsity_schedule_end=6,
        sparsity_schedule_frequency=2, distill_alpha=0.5 if trainer == "mixin" else 0.0,
    )  # fmt: skip
    if trainer == "mixin":
        trainer_class, kwargs = PruningSFTTrainer, {"pruning_args": pruning}
    else:
        trainer_class, kwargs = SFTTrainer, {"callbacks": [GradientPruningCallback(pruning)]}
    if mode == "killed":

        class Dying(trainer_class):
            def _save_rng_state(self, output_dir: str) -> None:
                if self.state.global_step == KILL_AT_STEP:
                    os.kill(os.getpid(), signal.SIGKILL)
                super()._save_rng_state(output_dir)

        trainer_class = Dying
    run = trainer_class(
        model=tiny_llama(tokenizer), args=args, train_dataset=reviews(), processing_class=tokenizer, **kwargs
    )
    run.train(resume_from_checkpoint=True if mode == "resume" else None)
    save_pruned(run.model, Path(out_dir) / "final")


if __name__ == "__main__":
    main(*sys.argv[1:])
