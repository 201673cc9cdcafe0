"""Half of MiniLM's heads: how much does the choice of heads matter, and how much does mask tuning add?

On the peers' protocol (``common.py``): the fine-tuned dense MiniLM, 512 training reviews in batches of 32
for scoring, 6 of 12 heads removed from every layer, accuracy right after the cut (no training) on 2,000
test reviews and on the peers' 1,000. Choices of heads:

- ``fisher``: Σ g² of the head gates over batches of 32 (the default of ``compute_unit_importance``), and
  over single reviews (per-example Fisher);
- ``block Fisher``: the heads of a layer removed together, scored by Σ_batches (Σ_removed g)², which counts
  how removing one head changes the others (Kwon et al., 2022): their greedy rearrangement, and the exact
  best of all 924 sets of 6 in every layer;
- ``greedy by KL`` (``--greedy``, 20+ min): layer by layer, the head whose removal raises the KL divergence
  from the dense model's outputs on the calibration reviews least, six times: the choice measured, not
  estimated;
- Torch-Pruning's criterion: Σ |w · dL/dw| over the weights of the head (query, key, value rows, output
  columns), gradients summed over the calibration batches;
- random heads (3 seeds).

Then the default choice with mask tuning, by distillation (the default) and by least squares. No weight is
trained anywhere here.

Run: ``.venv/bin/python benchmarks/half_heads.py [--greedy]``. Writes ``results/half_heads.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import (
    UnitGates,
    capture_targets,
    capture_teacher,
    distill_unit_scales,
    prune_units,
    rescale_units,
)
from hf_gradprune.core.batches import batch_loss, split_examples
from hf_gradprune.structured.importance import gate_probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, accuracy, dense_minilm, encode, peer_split, results_header, write_results

NAME = "half_heads"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/structured/gates.py",
    "src/hf_gradprune/structured/mask_tuning.py",
    "src/hf_gradprune/structured/least_squares_tuning.py",
    "src/hf_gradprune/structured/selection.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
)
REMOVED = 6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration_reviews", type=int, default=512)
    parser.add_argument("--test_reviews", type=int, default=2000)
    parser.add_argument("--greedy", action="store_true", help="Also the greedy search by measured KL.")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    return parser.parse_args()


def gate_gradients(model, batches: list[dict], per_example: bool) -> torch.Tensor:
    """``(samples, layers, heads)`` gradients of the loss w.r.t. all-ones head gates."""
    rows = []
    with gate_probe(model, ["heads"]) as (gates,):
        for batch in batches:
            for part in split_examples(batch) if per_example else [batch]:
                (grad,) = torch.autograd.grad(batch_loss(model, part), [gates.gates])
                rows.append(grad.detach().clone())
    return torch.stack(rows)


def weight_taylor(model, batches: list[dict]) -> torch.Tensor:
    """``(layers, heads)``: Σ |w · Σ_batches dL/dw| over each head's query, key and value rows and output
    columns (Torch-Pruning's group Taylor criterion; BERT layout)."""
    model.zero_grad()
    with torch.enable_grad():
        for batch in batches:
            batch_loss(model, batch).backward()
    scores = torch.zeros(6, 12)
    for layer, block in enumerate(model.bert.encoder.layer):
        attention = block.attention
        for linear, axis in (
            (attention.self.query, 0),
            (attention.self.key, 0),
            (attention.self.value, 0),
            (attention.output.dense, 1),
        ):
            taylor = (linear.weight * linear.weight.grad).abs().detach()
            scores[layer] += taylor.sum(1 - axis).reshape(12, -1).sum(1)
            if axis == 0:
                scores[layer] += (linear.bias * linear.bias.grad).abs().detach().reshape(12, -1).sum(1)
    model.zero_grad()
    return scores


def lowest(scores: torch.Tensor) -> dict[int, list[int]]:
    return {layer: scores[layer].argsort()[:REMOVED].tolist() for layer in range(scores.shape[0])}


def rearranged(grads: torch.Tensor, chosen: dict[int, list[int]]) -> dict[int, list[int]]:
    """Kwon et al.'s greedy rearrangement: keep the count, lower the block-Fisher score of the set."""
    result = {}
    for layer in chosen:
        vectors = grads[:, layer, :].t()
        order = vectors.square().sum(1).argsort().tolist()
        removed = order[:REMOVED]
        for head in order[REMOVED:]:
            removed.append(head)
            sums = vectors[removed].sum(0) - vectors[removed]
            del removed[int(sums.square().sum(1).argmin())]
        result[layer] = sorted(removed)
    return result


def best_block_fisher(grads: torch.Tensor) -> dict[int, list[int]]:
    result = {}
    for layer in range(grads.shape[1]):
        vectors = grads[:, layer, :]
        sets = list(itertools.combinations(range(vectors.shape[1]), REMOVED))
        scores = [float(vectors[:, list(s)].sum(1).square().sum()) for s in sets]
        result[layer] = list(sets[min(range(len(sets)), key=scores.__getitem__)])
    return result


def greedy_by_kl(model, batches: list[dict]) -> dict[int, list[int]]:
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with torch.no_grad():
        reference = [model(**b).logits.log_softmax(-1) for b in inputs]

    def divergence(gates: torch.Tensor) -> float:
        with torch.no_grad(), UnitGates(model, "heads", gates=gates):
            return sum(
                float((r.exp() * (r - model(**b).logits.log_softmax(-1))).sum())
                for b, r in zip(inputs, reference, strict=True)
            )

    gates = torch.ones(6, 12)
    for layer in range(6):
        for _ in range(REMOVED):
            trials = {}
            for head in (h for h in range(12) if gates[layer, h] == 1):
                trial = gates.clone()
                trial[layer, head] = 0
                trials[head] = divergence(trial)
            gates[layer, min(trials, key=trials.get)] = 0
    return {layer: [h for h in range(12) if gates[layer, h] == 0] for layer in range(6)}


def random_heads(seed: int) -> dict[int, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randperm(12, generator=generator)[:REMOVED].tolist() for layer in range(6)}


def plot(results: dict, path: Path) -> None:
    rows = results["variants"]
    figure = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r["accuracy_test"] for r in rows], 0.4, label="2000 reviews")
    axes.bar([p + 0.2 for p in positions], [r["accuracy_peers_test"] for r in rows], 0.4, label="peers' 1000")
    axes.axhline(results["dense_accuracy"], color="black", linestyle="--", label="dense (2000)")
    axes.set_xticks(list(positions), [r["name"] for r in rows], fontsize=7, rotation=20, ha="right")
    axes.set_ylim(0.5, 0.82)
    axes.set_ylabel("accuracy right after the cut")
    axes.set_title("MiniLM, 6 of 12 heads removed from every layer, no training")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    train, test = peer_split(n_test=args.test_reviews)
    _, peers_test = peer_split(n_test=1000)
    calibration = encode(train[: args.calibration_reviews], 32)
    tests = {"test": encode(test, 128), "peers_test": encode(peers_test, 128)}
    dense = dense_minilm()
    batched, single = (gate_gradients(dense, calibration, per_example) for per_example in (False, True))
    default = lowest(batched.square().sum(0))
    choices = {
        "fisher, batches of 32 (default)": default,
        "fisher, single reviews": lowest(single.square().sum(0)),
        "block Fisher, Kwon's rearrangement": rearranged(batched, default),
        "block Fisher, best set per layer": best_block_fisher(batched),
        "Taylor |w·g| of the head's weights (Torch-Pruning)": lowest(weight_taylor(dense, calibration)),
        **{f"random, seed {seed}": random_heads(seed) for seed in range(3)},
    }
    if args.greedy:
        choices["greedy by measured KL"] = greedy_by_kl(dense, calibration)
    teacher = capture_teacher(dense, calibration, show_progress=False)
    targets = capture_targets(dense, calibration, show_progress=False)
    rows = []
    for name, heads in [
        *choices.items(),
        ("default + mask tuning", default),
        ("default + least squares", default),
    ]:
        model = copy.deepcopy(dense)
        prune_units(model, {"heads": heads})
        report = {}
        if name == "default + mask tuning":
            report = distill_unit_scales(model, calibration, teacher, show_progress=False)
        elif name == "default + least squares":
            report = rescale_units(model, calibration, targets, show_progress=False)
        row = {"name": name, "heads": heads, **report}
        row.update({f"accuracy_{split}": accuracy(model, batches) for split, batches in tests.items()})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "heads"}), flush=True)
    results = {
        **results_header(NAME, args),
        "dense_accuracy": accuracy(dense, tests["test"]),
        "dense_accuracy_peers_test": accuracy(dense, tests["peers_test"]),
        "variants": rows,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print("\n| heads removed (6 per layer) | accuracy right after (2000 / peers' 1000) |")
    print("|---|---:|")
    print(f"| none (dense) | {results['dense_accuracy']:.3f} / {results['dense_accuracy_peers_test']:.3f} |")
    for r in rows:
        name = r["name"].replace("|", "\\|")
        print(f"| {name} | {r['accuracy_test']:.4f} / {r['accuracy_peers_test']:.3f} |")


if __name__ == "__main__":
    main()
