"""Two real processes (``torchrun --nproc_per_node 2``, gloo on CPU) training a tiny BERT with weight pruning.

Each rank draws its importance batches from its own shard, so only the all-reduce of the importance makes
the ranks choose the same masks. The masks are compared as each rank saved them right after each pruning
step, before any forward: DDP broadcasts every module buffer from rank 0 before each forward (it collects
the buffers again each time), mask buffers included, so masks compared only at the end of training would
look equal across ranks even without the all-reduce; the weights, zeroed by each rank's own mask, would not.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from hf_gradprune.core.adapters import find_target_modules
from hf_gradprune.core.mask_files import load_masks

from .helpers import build_tiny

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("distributed"),  # one worker runs the module's two-process runs, once each
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

WORKER = Path(__file__).with_name("distributed_worker.py")
HEAD_REFUSAL = "Structural pruning during multi-process training is not supported"
# Step -> weight sparsity reached there, for the schedules of distributed_worker.PRUNING.
PRUNE_STEPS = {"one_shot": {0: 0.5}, "linear": {2: 0.5 / 3, 4: 1.0 / 3, 6: 0.5}, "heads0": {0: 0.5}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    out: Path, mode: str, env: dict[str, str] | None = None, worker: Path = WORKER
) -> subprocess.CompletedProcess:
    """Run ``worker`` on two CPU processes; the result, whatever the exit code."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), str(worker), str(out), mode]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def trained(out: Path, mode: str, env: dict[str, str] | None = None) -> Path:
    """``out`` after a successful two-process run of ``mode``."""
    result = torchrun(out, mode, env)
    if result.returncode != 0:
        pytest.fail(f"torchrun {mode} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module", params=sorted(PRUNE_STEPS))
def run(request, tmp_path_factory) -> tuple[str, Path]:
    """``(mode, output folder)`` of a two-process run with the all-reduce in place."""
    return request.param, trained(tmp_path_factory.mktemp("ddp") / request.param, request.param)


def masks_per_step(out: Path, rank: int) -> dict[int, dict[str, torch.Tensor]]:
    """The masks rank ``rank`` saved right after each step at which they changed."""
    prefix = f"masks_rank{rank}_step"
    return {
        int(path.name[len(prefix) : -len(".safetensors")]): load_masks(path)
        for path in out.glob(f"{prefix}*.safetensors")
    }


def different_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


def test_distributed_importance_batches_differ_per_rank(run):
    _, out = run
    first, second = (load_file(out / f"batches_rank{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys() and first
    # The ranks score importance on different data: without the all-reduce their masks would differ.
    assert different_tensors(first, second) == list(first)


def test_distributed_heads_equal_across_ranks(run):
    mode, out = run
    first, second = (json.loads((out / f"heads_rank{rank}.json").read_text()) for rank in (0, 1))
    assert first == second
    assert [len(heads) for heads in first.values()] == ([1, 1, 1] if mode == "heads0" else [])


def test_distributed_masks_equal_across_ranks_at_every_pruning_step(run):
    mode, out = run
    targets = {f"{name}.weight" for name in find_target_modules(build_tiny("bert"))}
    first, second = masks_per_step(out, 0), masks_per_step(out, 1)
    assert set(first) == set(second) == set(PRUNE_STEPS[mode])
    for step, sparsity in PRUNE_STEPS[mode].items():
        assert first[step].keys() == targets
        assert different_tensors(first[step], second[step]) == [], f"step {step}"
        for name, mask in first[step].items():
            assert int((~mask).sum()) == round(sparsity * mask.numel()), f"step {step}: {name}"
    for earlier, later in itertools.pairwise(sorted(first)):
        assert all(not (first[later][n] & ~first[earlier][n]).any() for n in targets), "masks not monotone"


def test_distributed_final_masks_half_zero_and_masked_weights_zero_on_both_ranks(run):
    _, out = run
    final = [load_masks(out / f"masks_rank{rank}.safetensors") for rank in (0, 1)]
    assert different_tensors(*final) == []
    for rank, masks in enumerate(final):
        weights = load_file(out / f"weights_rank{rank}.safetensors")
        for name, mask in masks.items():
            assert int((~mask).sum()) * 2 == mask.numel(), name  # per_tensor: exactly 50% of each
            assert torch.count_nonzero(weights[name][~mask]) == 0, f"rank {rank}: {name}"
            assert int((weights[name] == 0).sum()) * 2 == mask.numel(), f"rank {rank}: {name}"


def test_distributed_weights_equal_across_ranks(run):
    _, out = run
    first, second = (load_file(out / f"weights_rank{rank}.safetensors") for rank in (0, 1))
    initial = dict(build_tiny("bert").named_parameters())
    assert first.keys() == initial.keys()
    assert different_tensors(first, second) == []
    assert not torch.equal(first["classifier.weight"], initial["classifier.weight"].detach()), "no training"
    if run[0] == "heads0":  # the cut is structural on both ranks: one head (8 rows) fewer per layer
        assert all(
            first[f"bert.encoder.layer.{i}.attention.self.query.weight"].shape == (24, 32) for i in range(3)
        )


def test_distributed_without_all_reduce_masks_differ(tmp_path):
    # The control: with the all-reduce replaced by the identity, each rank selects from its own shard.
    out = trained(tmp_path / "no_all_reduce", "linear", env={"HF_GRADPRUNE_TEST_NO_ALLREDUCE": "1"})
    first, second = masks_per_step(out, 0), masks_per_step(out, 1)
    # Rank 1 also records steps 3, 5 and 7: the forward after each pruning step overwrote its mask buffers
    # with rank 0's (DDP's buffer broadcast), see the module docstring.
    assert set(first) == set(PRUNE_STEPS["linear"]) <= set(second)
    assert all(different_tensors(first[step], second[step]) for step in first)
    weights = [load_file(out / f"weights_rank{rank}.safetensors") for rank in (0, 1)]
    assert different_tensors(*weights)


def test_distributed_head_pruning_refused_on_every_rank(tmp_path):
    out = tmp_path / "heads"
    result = torchrun(out, "heads")
    assert result.returncode != 0
    assert HEAD_REFUSAL in result.stderr
    for rank in (0, 1):
        assert (out / f"error_rank{rank}.txt").read_text().startswith(HEAD_REFUSAL)
    assert not list(out.glob("masks_rank*")), "training went on after the refusal"


def test_distributed_flops_budget_cuts_the_same_heads_and_neurons_on_every_rank(tmp_path):
    out = trained(tmp_path / "flops0", "flops0")
    first, second = (json.loads((out / f"record_rank{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and first["pruned_ffn"] and first["pruned_heads"]
    weights = [load_file(out / f"weights_rank{rank}.safetensors") for rank in (0, 1)]
    assert different_tensors(*weights) == []
    # The control: each rank scoring only its own shard cuts other units, and DDP cannot wrap models of
    # different shapes.
    control = torchrun(tmp_path / "flops0_control", "flops0", env={"HF_GRADPRUNE_TEST_NO_ALLREDUCE": "1"})
    assert control.returncode != 0


def test_distributed_distillation_trains_the_same_model_on_every_rank(tmp_path):
    out = trained(tmp_path / "distill", "distill")
    first, second = (json.loads((out / f"record_rank{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and first["pruned_ffn"] and first["pruned_heads"]
    weights = [load_file(out / f"weights_rank{rank}.safetensors") for rank in (0, 1)]
    assert different_tensors(*weights) == []
    # One teacher, the model before the cut, saved once by the main process.
    teacher = load_file(out / "trainer" / "distillation_teacher" / "model.safetensors")
    dense = build_tiny("bert").state_dict()
    assert all(torch.equal(teacher[k], dense[k]) for k in teacher) and teacher.keys() <= dense.keys()
    # The control: the same cut trained without distillation ends elsewhere.
    plain = trained(tmp_path / "plain", "flops0")
    assert different_tensors(weights[0], load_file(plain / "weights_rank0.safetensors"))


def test_distributed_fsdp_refuses_what_reads_whole_parameters_with_the_reason(tmp_path):
    out = tmp_path / "fsdp"
    result = torchrun(out, "fsdp")
    assert result.returncode != 0
    for rank in (0, 1):
        message = (out / f"error_rank{rank}.txt").read_text()
        assert message.startswith("Under FSDP2 hf_gradprune prunes weights in one shot"), message
        assert "not yet --scoring_passes 2" in message and "docs/scaling.md" in message
