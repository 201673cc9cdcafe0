"""Worker of ``tests/test_fsdp.py``: masked training of a tiny Llama sharded with FSDP2 (``fully_shard``), run
by ``torchrun --nproc_per_node 2`` (gloo, CPU), or in one process without sharding (``single``).

``python fsdp_worker.py OUT MODE``; modes:

- ``after``: masks applied after ``fully_shard`` (each sharded parameter gets its local mask and hook);
- ``before``: masks applied before ``fully_shard``, which replaces the parameters: ``reapply_masks`` after
  the first step finds them replaced and hooks the new ones;
- ``before_no_reapply``: the control, masks applied before ``fully_shard`` and never again;
- ``single``: one process, no sharding, the whole batch.

Every rank checks that the masked entries of its local shards are zero after each step (``zero_rank{R}``
in ``result.json``); rank 0 writes the full weights (``weights.safetensors``) and the masks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gradprune import compute_weight_importance, compute_weight_masks
from hf_gradprune.core.mask_files import save_masks
from hf_gradprune.core.masks import apply_masks, get_masks, reapply_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

from tests.helpers import leave_process_group

STEPS = 4


def build() -> tuple[LlamaForCausalLM, torch.Tensor, dict[str, torch.Tensor]]:
    """The tiny model, 8 sequences of 8 tokens, and 50% per-row magnitude masks of its block linears
    (37 FFN neurons: shards of uneven size)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    data = torch.randint(0, 64, (8, 8))
    scores = compute_weight_importance(model, method="magnitude", show_progress=False)
    return model, data, compute_weight_masks(scores, 0.5, "per_row")


def zero_where_masked(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """Whether every masked entry of this rank's part of each masked weight is exactly zero."""
    params = dict(model.named_parameters())
    zero = True
    for name, mask in masks.items():
        param = params[name]
        if isinstance(param, DTensor):
            local = param.to_local()
            offset = sum(s.shape[0] for s in torch.chunk(mask, dist.get_world_size())[: dist.get_rank()])
            mask = mask[offset : offset + local.shape[0]]
            param = local
        zero &= bool((param.detach()[~mask] == 0).all())
    return zero


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    model, data, masks = build()
    sharded = mode != "single"
    if sharded:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        data = data.chunk(world)[rank]
        if mode.startswith("before"):
            apply_masks(model, masks)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        if mode == "after":
            apply_masks(model, masks)
    else:
        rank = 0
        apply_masks(model, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    zero = True
    for _ in range(STEPS):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if mode != "before_no_reapply":
            reapply_masks(model)
        zero &= zero_where_masked(model, masks)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options) if sharded else model.state_dict()
    result = {f"zero_rank{rank}": zero}
    if sharded:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        result = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
        save_masks(get_masks(model), out / "masks.safetensors")
        (out / "result.json").write_text(json.dumps(result))
    if sharded:
        leave_process_group()


if __name__ == "__main__":
    main()
