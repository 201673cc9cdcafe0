"""An image-classification script shaped like transformers'
``examples/pytorch/image-classification/run_image_classification.py`` (an image folder, an image processor, a
CNN from ``AutoModelForImageClassification``, the example's ending), as a ``Trainer`` user has it with the two
changes that make it prune: the lines marked ``# hf_gradprune``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_gradprune import PruningArguments, PruningTrainer


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A model folder or Hub id."})


@dataclass
class DataTrainingArguments:
    train_dir: str = field(metadata={"help": "A folder of images, one subfolder per class."})
    validation_dir: str = field(metadata={"help": "A folder like the training folder."})
    dataset_name: str | None = field(default=None, metadata={"help": "The dataset's Hub id, for the card."})


def main() -> None:
    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments, PruningArguments)  # hf_gradprune
    parser = HfArgumentParser(arguments)
    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses()  # hf_gradprune
    set_seed(training_args.seed)

    dataset = load_dataset(
        "imagefolder",
        data_files={"train": f"{data_args.train_dir}/**", "validation": f"{data_args.validation_dir}/**"},
    )
    labels = dataset["train"].features["label"].names
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id={label: i for i, label in enumerate(labels)},
        id2label=dict(enumerate(labels)),
        finetuning_task="image-classification",
    )
    model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config)
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)

    def transforms(batch):
        images = [image.convert("L") for image in batch["image"]]
        batch["pixel_values"] = image_processor(images, return_tensors="pt")["pixel_values"]
        return batch

    dataset["train"].set_transform(transforms)
    dataset["validation"].set_transform(transforms)

    def collate_fn(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["label"] for example in examples]),
        }

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    trainer = PruningTrainer(  # hf_gradprune
        pruning_args=pruning_args,  # hf_gradprune
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name,
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
