"""The main job end to end, offline: prune the real MiniLM on real reviews, push, load back from the Hub.

`make demo` runs this. It starts hf_gradprune's local Hub-protocol server (the real ``huggingface_hub``
client talks to it through ``HF_ENDPOINT``), runs ``examples/text_classification.py`` with structured
pruning (heads and FFN neurons to half the block FLOPs, with mask tuning), 30% weight sparsity and
``--push_to_hub``, then loads the pushed model in a fresh process with ``load_pruned`` and checks its logits
against the local copy. Accuracy is reported before pruning, right after it and after fine-tuning on.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
from pathlib import Path

from hf_gradprune.testing import LocalHub

HERE = Path(__file__).resolve().parent
REPO_ID = "demo-user/minilm-rotten-tomatoes-pruned"

RELOAD = """
import json, sys, torch
from transformers import AutoTokenizer
from hf_gradprune import load_pruned
from hf_gradprune.testing import load_rotten_tomatoes
repo_id, local = sys.argv[1], sys.argv[2]
texts = load_rotten_tomatoes()["test"]["text"][:16]
tokenizer = AutoTokenizer.from_pretrained(repo_id)
batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
with torch.no_grad():
    hub, disk = load_pruned(repo_id)(**batch).logits, load_pruned(local)(**batch).logits
diff = float((hub - disk).abs().max())
print(json.dumps({"max_abs_diff": diff, "identical": bool(torch.equal(hub, disk))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="runs/demo", help="Where the model, logs and the Hub live.")
    parser.add_argument("--max_steps", type=int, default=120, help="Fine-tuning steps.")
    parser.add_argument(
        "--prune_step", type=int, default=40, help="Step at which heads and weights are pruned."
    )
    options = parser.parse_args()
    out = Path(options.output_dir).resolve()
    token = secrets.token_hex(16)
    with LocalHub(out / "hub", token=token) as hub:
        endpoint = hub.endpoint
        env = hub.client_env(out / "hf_home", token)  # child processes talk to this hub, with this token
        print(f"Local Hub at {endpoint}")
        # Fine-tune, score heads, FFN neurons and weights at --prune_step, cut to half the block FLOPs,
        # rescale the kept units, fine-tune on. The evaluation at that step (dense) is "before pruning", the
        # one the trainer makes right after the cut "right after", the final one "after".
        flags = [
            *("--output_dir", str(out / "model"), "--hub_model_id", REPO_ID, "--push_to_hub", "true"),
            *f"--max_steps {options.max_steps} --prune_steps {options.prune_step}".split(),
            *f"--eval_strategy steps --eval_steps {options.prune_step} --max_eval_samples 400".split(),
            *["--learning_rate", "2e-4", "--warmup_steps", "10", "--seed", "0", "--max_seq_length", "96"],
            *["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64"],
            *["--logging_steps", "10", "--save_strategy", "no", "--report_to", "tensorboard"],
            *["--target_flops_ratio", "0.5", "--flops_seq_len", "96", "--mask_tuning", "true"],
            *["--measure_speedup", "true", "--weight_sparsity", "0.3", "--importance_batches", "8"],
        ]
        subprocess.run([sys.executable, str(HERE / "text_classification.py"), *flags], check=True, env=env)
        results = json.loads((out / "model" / "pruning_results.json").read_text())
        check = subprocess.run(
            [sys.executable, "-c", RELOAD, REPO_ID, str(out / "model")],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        reload = json.loads(check.stdout.strip().splitlines()[-1])
    before, right_after, after = (
        results["eval_before"],
        results["eval_right_after_pruning"],
        results["eval_after"],
    )
    print("\n=== hf_gradprune demo ===")
    print(f"Heads per layer: {results['heads_per_layer']}  (12 before)")
    print(f"FFN neurons per layer: {results['ffn_per_layer']}  (1536 before)")
    flops, speedup = results["flops_ratio"], results["speedup"]
    print(f"Block FLOPs: {flops:.1%} of the original; measured forward speed-up {speedup:.2f}x")
    print(f"Zero weights in the pruned matrices: {results['weight_sparsity']['overall']:.2%}")
    print(f"Parameters: {results['params_before']:,} -> {results['params_after']:,}")
    for metric in ("eval_accuracy", "eval_f1"):
        print(
            f"{metric[5:].capitalize():9s} before pruning (step {options.prune_step}) {before[metric]:.4f}, "
            f"right after pruning {right_after[metric]:.4f}, after fine-tuning to step {options.max_steps} "
            f"{after[metric]:.4f}"
        )
    print(f"Pushed to {endpoint}/{REPO_ID} at commit {results['hub']['commit']}")
    print(
        f"Loaded back with load_pruned({REPO_ID!r}) in a fresh process: logits identical to the local copy: "
        f"{reload['identical']} (max |diff| {reload['max_abs_diff']:.1e})"
    )
    print(f"Model card: {out / 'model' / 'README.md'}; TensorBoard logs: {out / 'model' / 'runs'}")
    if not reload["identical"]:
        sys.exit("The model loaded from the Hub differs from the local one.")


if __name__ == "__main__":
    main()
