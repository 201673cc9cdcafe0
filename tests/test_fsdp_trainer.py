"""Weight pruning through the ``Trainer``'s FSDP2 path (``fsdp=True, fsdp_config={"fsdp_version": 2}``), two
real processes (gloo, CPU): importance summed across ranks into sharded accumulators, masks chosen on the
shards, held through AdamW with weight decay, saved whole, resumed after SIGKILL (``fsdp_trainer_worker.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_gradprune import PruningRecord, load_pruned
from hf_gradprune.core.mask_files import load_masks
from hf_gradprune.core.masks import get_masks
from hf_gradprune.testing import LocalHub

from .fsdp_trainer_worker import HUB_REPO, HUB_TOKEN
from .test_distributed import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
# (family, criterion, pattern, trainer): both families, a gradient and an activation criterion, per tensor
# (rows split unevenly: 37 FFN neurons) and 2:4, PruningTrainer and a plain Trainer with the callback, and a
# linear schedule whose later steps score and re-mask the sharded model mid-training.
CASES = [
    ("llama", "obd", "per_tensor", "pruning"),
    ("llama", "wanda", "2:4", "pruning"),
    ("bert", "wanda", "per_tensor", "pruning"),
    ("bert", "obd", "2:4", "callback"),
    ("llama", "obd", "linear", "pruning"),
]


def run(out: Path, mode: str) -> Path:
    """``out`` after the worker ran ``mode``: one process for ``single``, else two under torchrun."""
    if mode.startswith("single"):
        out.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(WORKER), str(out), mode]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    else:
        result = torchrun(out, mode, worker=WORKER)
    assert result.returncode == 0, f"{mode} failed:\n{result.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def case(request, tmp_path_factory) -> tuple[tuple[str, ...], Path, Path]:
    """``(case, one-process run, two-process FSDP2 run)``."""
    mode = ",".join(request.param)
    root = tmp_path_factory.mktemp("fsdp_trainer")
    return request.param, run(root / "single", f"single,{mode}"), run(root / "fsdp", f"fsdp,{mode}")


def results(out: Path) -> list[dict]:
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[name] != b[name]).sum()) for name in a)


def test_fsdp_trainer_masks_are_those_of_one_process(case):
    _, single, fsdp = case
    assert all(r["fsdp"] and r["sharded"] for r in results(fsdp)), results(fsdp)
    masks = load_masks(single / "masks_rank0.safetensors")
    assert masks
    for rank in (0, 1):
        assert differing(masks, load_masks(fsdp / f"masks_rank{rank}.safetensors")) == 0


def test_fsdp_trainer_masked_weights_stay_zero_on_every_shard(case):
    _, _, fsdp = case
    assert [r["zero"] for r in results(fsdp)] == [True, True]
    assert [r["steps"] for r in results(fsdp)] == [6, 6]


def test_fsdp_trainer_saves_what_one_process_saves(case):
    """PruningTrainer.save_model, or the plain Trainer's last checkpoint, under FSDP2: the whole model and
    masks, as one process saves them; the folder loads with load_pruned in this (another) process."""
    (*_, trainer), single, fsdp = case
    folder = "saved" if trainer == "pruning" else "trainer/checkpoint-6"
    single, fsdp = single / folder, fsdp / folder
    expected, saved = load_file(single / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert expected.keys() == saved.keys()
    for name in expected:
        # AdamW scales rounding in near-zero gradients up to whole steps (lr 1e-2): a key bias, whose gradient
        # is 0 but for rounding (softmax ignores it), moves by steps; elsewhere a tenth of a step at most.
        if not name.endswith("attention.self.key.bias"):
            torch.testing.assert_close(saved[name], expected[name], rtol=0, atol=1e-3, msg=name)
    masks = load_masks(fsdp / "pruning_masks.safetensors")
    assert differing(masks, load_masks(single / "pruning_masks.safetensors")) == 0
    model = load_pruned(fsdp)
    assert differing(get_masks(model), masks) == 0
    state = model.state_dict()
    for name, mask in masks.items():
        assert torch.count_nonzero(state[name][~mask]) == 0
        torch.testing.assert_close(state[name], saved[name], rtol=0, atol=0)


def test_fsdp_trainer_control_without_the_cross_rank_sum_disagrees(tmp_path):
    """The control: each rank scores on its own examples only, and the masks differ from one process's."""
    single = run(tmp_path / "single", "single,llama,obd,per_tensor")
    control = run(tmp_path / "control", "control,llama,obd,per_tensor")
    masks = load_masks(single / "masks_rank0.safetensors")
    assert differing(masks, load_masks(control / "masks_rank0.safetensors")) > 100


@pytest.mark.parametrize("pattern", ["per_tensor", "flops"])
def test_fsdp_trainer_resumes_after_sigkill_as_if_never_stopped(tmp_path, pattern):
    """Weights pruned on the shards, or heads and FFN neurons cut at step 0 too (replayed from the checkpoint
    before the model is sharded again): the resumed run ends where the uninterrupted one does, bit for bit."""
    whole = run(tmp_path / "whole", f"fsdp,llama,obd,{pattern}")
    killed = tmp_path / "killed"
    assert torchrun(killed, f"kill,llama,obd,{pattern}", worker=WORKER).returncode != 0
    assert (killed / "trainer/checkpoint-4/optimizer.safetensors").is_file()
    run_resumed = torchrun(killed, f"resume,llama,obd,{pattern}", worker=WORKER)
    assert run_resumed.returncode == 0, run_resumed.stderr[-4000:]
    assert [r["steps"] for r in results(killed)] == [2, 2]  # steps 5 and 6 only
    assert [r["zero"] for r in results(killed)] == [True, True]
    expected, resumed = (
        load_file(whole / "saved/model.safetensors"),
        load_file(killed / "saved/model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    masks = load_masks(whole / "saved/pruning_masks.safetensors")
    assert differing(masks, load_masks(killed / "saved/pruning_masks.safetensors")) == 0


def test_fsdp_trainer_cuts_structures_at_step_0_before_sharding(tmp_path):
    """PruningTrainer cuts heads and FFN neurons to half the FLOPs (mask tuning, importance all-reduced) on
    the whole model before accelerate shards it, then prunes weights on the shards: every rank cuts the same
    units, masks hold on the shards, and the saved folder loads with load_pruned as the pruned model."""
    out = run(tmp_path / "fsdp", "fsdp,llama,obd,flops")
    assert all(r["fsdp"] and r["sharded"] and r["zero"] for r in results(out)), results(out)
    masks = load_masks(out / "masks_rank0.safetensors")
    assert masks and differing(masks, load_masks(out / "masks_rank1.safetensors")) == 0
    model = load_pruned(out / "saved")
    record = PruningRecord.from_config(model.config)
    assert record.pruned_heads and record.pruned.get("ffn"), record
    assert differing(get_masks(model), masks) == 0
    saved = load_file(out / "saved/model.safetensors")
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, saved[name], rtol=0, atol=0)


def test_fsdp_trainer_trains_bf16_mixed_precision_after_scoring(tmp_path):
    """``bf16=True`` under FSDP2: accelerate's mixed precision computes with bf16 copies of float32 shards.
    Scoring runs the model's first forward with every parameter frozen, where FSDP2 sets up its precision; it
    is refreshed after, so training stores float32 gradients (else: a bf16 gradient for a float32 shard)."""
    out = run(tmp_path / "fsdp", "fsdp,llama,obd,per_tensor,pruning,bf16")
    assert [(r["zero"], r["sharded"], r["steps"]) for r in results(out)] == [(True, True, 6)] * 2
    masks = load_masks(out / "masks_rank0.safetensors")
    assert differing(masks, load_masks(out / "masks_rank1.safetensors")) == 0
    # One process with bf16 autocast rounds elsewhere: within 2% (without the cross-rank sum: 10% differ).
    single = load_masks(
        run(tmp_path / "single", "single,llama,obd,per_tensor,pruning,bf16") / "masks_rank0.safetensors"
    )
    assert differing(masks, single) < 0.02 * sum(mask.numel() for mask in masks.values())
    saved = load_file(out / "saved/model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    model = load_pruned(out / "saved")
    for name, mask in masks.items():
        assert torch.count_nonzero(model.get_parameter(name)[~mask]) == 0


DOWNLOAD = """
import json, sys
from huggingface_hub import HfApi, snapshot_download
token, repo, folder = sys.argv[1:]
print(json.dumps([commit.title for commit in HfApi(token=token).list_repo_commits(repo)]))
snapshot_download(repo, token=token, local_dir=folder)
"""


def test_fsdp_trainer_pushes_checkpoints_and_the_model_to_the_hub(tmp_path):
    """The Trainer's default ``hub_strategy`` (``every_save``) under FSDP2: every rank takes part in each
    checkpoint's card (its zeros are counted on the shards), the first pushes; then ``save_model``, which
    pushes too, and ``push_to_hub``. What lands on the Hub is the saved model, with its masks and a card
    that counts them."""
    with LocalHub(tmp_path / "hub", token=HUB_TOKEN) as hub:
        out = tmp_path / "push"
        env = hub.client_env(tmp_path / "hf_home")
        result = torchrun(out, "push,llama,obd,per_tensor", env=env, worker=WORKER)
        assert result.returncode == 0, result.stderr[-4000:]
        command = [sys.executable, "-c", DOWNLOAD, HUB_TOKEN, HUB_REPO, str(tmp_path / "download")]
        client = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
    titles = json.loads(client.stdout.splitlines()[-1])
    # The newest first; the pushes of save_model and push_to_hub commit only what changed since step 6's.
    assert titles[-1] == "Training in progress, step 3", titles
    download = tmp_path / "download"
    assert "Zero weights in the pruned layers:** 50.00%" in (download / "README.md").read_text()
    masks = load_masks(out / "saved/pruning_masks.safetensors")
    assert differing(load_masks(download / "pruning_masks.safetensors"), masks) == 0
    model, saved = load_pruned(download), load_file(out / "saved/model.safetensors")
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, saved[name], rtol=0, atol=0)
