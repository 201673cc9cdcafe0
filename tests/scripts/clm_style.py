"""A causal-LM script shaped like transformers' ``examples/pytorch/language-modeling/run_clm.py`` (text files,
tokenized and grouped into blocks, perplexity, the example's ending), as a ``Trainer`` user has it with the
two changes that make it prune: the lines marked ``# hf_gradprune``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import chain

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_gradprune import PruningArguments, PruningTrainer


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A model folder or Hub id."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A text file, one document per line."})
    validation_file: str = field(metadata={"help": "A text file like the training file."})
    dataset_name: str | None = field(default=None, metadata={"help": "The dataset's Hub id, for the card."})
    block_size: int = field(default=64)


def main() -> None:
    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments, PruningArguments)  # hf_gradprune
    parser = HfArgumentParser(arguments)
    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses()  # hf_gradprune
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    raw_datasets = load_dataset(
        "text", data_files={"train": data_args.train_file, "validation": data_args.validation_file}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw_datasets.map(
            lambda rows: tokenizer(rows["text"]), batched=True, remove_columns=["text"]
        )
    block_size = data_args.block_size

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated["input_ids"]) // block_size * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized.map(group_texts, batched=True)

    trainer = PruningTrainer(  # hf_gradprune
        pruning_args=pruning_args,  # hf_gradprune
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"] if training_args.do_train else None,
        eval_dataset=lm_datasets["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    if training_args.do_train:
        train_result = trainer.train(
            resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint
        )
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(lm_datasets["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        kwargs["dataset"] = data_args.dataset_name

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
