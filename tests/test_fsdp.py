"""Weight masks on a model sharded with FSDP2 (``fully_shard``), two real processes (gloo, CPU): each sharded
parameter is masked on its own shard, gradients where FSDP hands them over, weights after every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from hf_gradprune.core.mask_files import load_masks

from .test_distributed import torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("distributed"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same masked training in one process without sharding, on the whole batch."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run(
        [sys.executable, str(WORKER), str(out), "single"], check=True, capture_output=True, timeout=240
    )
    return load_file(out / "weights.safetensors"), load_masks(out / "masks.safetensors")


def run(tmp_path, mode):
    out = tmp_path / mode
    result = torchrun(out, mode, worker=WORKER)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), load_file(out / "weights.safetensors"), out


@pytest.mark.parametrize("mode", ["after", "before"])
def test_fsdp2_masks_hold_on_every_shard_and_train_as_one_process(tmp_path, single, mode):
    """Masks applied after sharding, or before it (the parameters ``fully_shard`` swaps in get their hooks
    at the first ``reapply_masks``): every masked entry is zero on each rank's shard after each AdamW step
    with weight decay, and the gathered weights are those of one process on the whole batch."""
    weights, masks = single
    result, sharded, out = run(tmp_path, mode)
    assert result == {"zero_rank0": True, "zero_rank1": True}
    assert load_masks(out / "masks.safetensors").keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(load_masks(out / "masks.safetensors")[name], mask)
        assert not sharded[name][~mask].any(), name
    for name, weight in weights.items():
        torch.testing.assert_close(sharded[name], weight, atol=1e-6, rtol=0)


def test_fsdp2_masks_applied_before_sharding_and_never_again_do_not_hold(tmp_path, single):
    """The control: the hooks of the parameters ``fully_shard`` replaced are gone, and nothing re-zeroes."""
    _, masks = single
    result, sharded, _ = run(tmp_path, "before_no_reapply")
    assert result == {"zero_rank0": False, "zero_rank1": False}
    assert any(sharded[name][~mask].any() for name, mask in masks.items())
