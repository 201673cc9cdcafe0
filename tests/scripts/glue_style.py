"""A text-classification script shaped like transformers' ``examples/pytorch/text-classification/run_glue.py``
(csv files, string labels, resume from the last checkpoint, metrics and state saved, the example's ending),
as a ``Trainer`` user has it with the two changes that make it prune: the lines marked ``# hf_gradprune``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_gradprune import PruningArguments, PruningTrainer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A model folder or Hub id."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A csv file with `sentence` and `label` columns."})
    validation_file: str = field(metadata={"help": "A csv file like the training file."})
    test_file: str | None = field(default=None, metadata={"help": "A csv file to predict."})
    task_name: str | None = field(default=None, metadata={"help": "A GLUE task name, for the model card."})
    max_seq_length: int = field(default=128)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def main() -> None:
    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments, PruningArguments)  # hf_gradprune
    parser = HfArgumentParser(arguments)
    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses()  # hf_gradprune
    logging.basicConfig(level=logging.INFO)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info("Checkpoint detected, resuming training at %s.", last_checkpoint)
    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.test_file is not None:
        data_files["test"] = data_args.test_file
    raw_datasets = load_dataset("csv", data_files=data_files)
    label_list = sorted(raw_datasets["train"].unique("label"))
    label_to_id = {label: i for i, label in enumerate(label_list)}

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, num_labels=len(label_list), finetuning_task=data_args.task_name
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)
    model.config.label2id = label_to_id
    model.config.id2label = {i: label for label, i in label_to_id.items()}

    def preprocess_function(examples):
        result = tokenizer(examples["sentence"], max_length=data_args.max_seq_length, truncation=True)
        result["labels"] = [label_to_id[label] for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function, batched=True, remove_columns=["sentence", "label"]
        )
    train_dataset = raw_datasets["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    eval_dataset = raw_datasets["validation"]
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = np.argmax(p.predictions, axis=1)
        return {"accuracy": (preds == p.label_ids).astype(np.float32).mean().item()}

    trainer = PruningTrainer(  # hf_gradprune
        pruning_args=pruning_args,  # hf_gradprune
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        predict_dataset = raw_datasets["test"].remove_columns("labels")
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "predict_results.txt")
            with open(path, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(np.argmax(predictions, axis=1)):
                    writer.write(f"{index}\t{label_list[item]}\n")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
