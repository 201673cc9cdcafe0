"""``examples/causal_lm_pruning.py`` as a user runs it, on the real SmolLM2 and rotten_tomatoes reviews: a few
batches and steps, the recovery with distillation from the model before the cut."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

SCRIPT = Path(__file__).parents[1] / "examples" / "causal_lm_pruning.py"


def test_causal_lm_example_recovers_with_distillation_and_keeps_the_masks(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--criteria", "magnitude", "--no-sequential"]
    flags += ["--calibration_batches", "1", "--eval_batches", "1", "--batch_size", "2", "--seq_len", "32"]
    flags += ["--flops_ratio", "0.9", "--finetune_steps", "2", "--distill_alpha", "0.5"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    finetune = json.loads((tmp_path / "causal_lm_pruning.json").read_text())["finetune"]
    assert finetune["distill_alpha"] == 0.5
    assert finetune["distill_kl"] and all(math.isfinite(kl) and kl >= 0 for kl in finetune["distill_kl"])
    assert finetune["revived_weights"] == 0 and finetune["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert math.isfinite(finetune["perplexity"])
    assert "Recovery: obd 50% per row, 2 steps" in result.stdout
