"""Weight reconstruction: after some weights of a layer are pruned, update the ones kept so the layer, or its
whole block, computes what it did before.

- :func:`sparsegpt_prune`: SparseGPT (Frantar and Alistarh, 2023), faithful to the paper and its code: the
  Hessian ``H = 2 X Xᵀ / n`` of a linear layer's inputs with 1% dampening, its inverse's upper Cholesky
  factor, lazy column blocks of 128, and for each column in order the Optimal Brain Surgeon update of the
  columns after it. The mask is chosen on the way (unstructured per block of columns, per row, or N:M), or
  given (then it is the least-squares update under that mask of any criterion).
- :func:`tune_block`: Adam steps on a block's output error against the dense block's outputs with the masks
  held, the "regional optimization" of Wanda++ (Yang et al., 2025).

The Hessians, inputs and outputs come from :mod:`hf_gradprune.weights.blockwise`, which runs them block by
block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.masks import reapply_masks


def add_to_hessian(hessian: torch.Tensor, count: list[int], inputs: torch.Tensor) -> None:
    """Fold the rows of ``inputs`` (``(..., in_features)``) into the running ``2 X Xᵀ / n`` of ``hessian``
    (float32), ``count[0]`` being ``n`` so far, as SparseGPT's ``add_batch`` does."""
    rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    total = count[0] + rows.shape[0]
    hessian.mul_(count[0] / total)
    rows = rows * (2.0 / total) ** 0.5
    hessian.addmm_(rows.T, rows)
    count[0] = total


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = percdamp · mean(diag H)``."""
    damp = percdamp * torch.mean(torch.diag(hessian))
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    hessian = hessian.clone()
    hessian[diagonal, diagonal] += damp
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def _block_mask(
    weights: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float, per_row: bool
) -> torch.Tensor:
    """Pruned entries of a column block: the ``sparsity`` fraction with the lowest ``w² / [H⁻¹]ᵢᵢ²``, over the
    block (SparseGPT's unstructured rule) or in each row."""
    saliency = weights.square() / hinv_diag.square().unsqueeze(0)
    if per_row:
        count = round(sparsity * saliency.shape[1])
        pruned = torch.zeros_like(saliency, dtype=torch.bool)
        return pruned.scatter_(1, saliency.argsort(dim=1, stable=True)[:, :count], True)
    flat = saliency.flatten()
    count = int(flat.numel() * sparsity)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[flat.argsort(stable=True)[:count]] = True
    return pruned.view_as(saliency)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    per_row: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a ``(out_features, in_features)`` weight with SparseGPT and update what it keeps.

    Columns are visited in order; each pruned entry's error is spread over the columns not yet visited by
    the Optimal Brain Surgeon update ``δ = -(w / [H⁻¹]ᵢᵢ) [H⁻¹]ᵢ,ᵢ:``, with ``H⁻¹`` restricted to those
    columns (the rows of the upper Cholesky factor of ``H⁻¹`` give it for every column at once), lazily in
    blocks of ``blocksize`` columns. Inputs that never fire (a zero on ``H``'s diagonal) are pruned and get
    weight 0.

    Args:
        weight (`torch.Tensor`): the layer's weight, ``(out, in)``; not changed.
        hessian (`torch.Tensor`): ``2 X Xᵀ / n`` of the layer's inputs, ``(in, in)``
            (:func:`add_to_hessian`).
        sparsity (`float`, *optional*): the fraction pruned in each block of columns (over all rows, as
            SparseGPT's code, or in each row with ``per_row``); not with ``n_m``.
        n_m (`tuple[int, int]`, *optional*): ``(N, M)``: keep N of every M consecutive inputs of each row,
            chosen at the first of the M columns.
        per_row (`bool`, *optional*, defaults to `False`): ``sparsity`` in each row of each column block.
        blocksize (`int`, *optional*, defaults to 128): columns per lazy block.
        percdamp (`float`, *optional*, defaults to 0.01): dampening, a fraction of the mean of ``diag(H)``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the new float32 weight (zeros where pruned) and the keep-mask.

    Example:
        >>> import torch
        >>> inputs = torch.randn(256, 8)
        >>> hessian = torch.zeros(8, 8)
        >>> add_to_hessian(hessian, [0], inputs)
        >>> weight, keep = sparsegpt_prune(torch.randn(4, 8), hessian, n_m=(2, 4))
        >>> keep.view(4, 2, 4).sum(-1).tolist() == [[2, 2]] * 4, bool((weight[~keep] == 0).all())
        (True, True)
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("Pass exactly one of `sparsity` and `n_m`.")
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"`hessian` must be ({columns}, {columns}) for a weight {tuple(weight.shape)}.")
    if n_m is not None and columns % n_m[1]:
        raise ValueError(f"{columns} inputs are not a multiple of M={n_m[1]}.")
    if n_m is not None and blocksize % n_m[1]:
        raise ValueError(f"`blocksize` {blocksize} is not a multiple of M={n_m[1]}.")
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if sparsity is not None:
            mask1 = _block_mask(W1, torch.diag(Hinv1), sparsity, per_row)
        for i in range(end - start):
            w, d = W1[:, i], Hinv1[i, i]
            if n_m is not None and i % n_m[1] == 0:
                saliency = W1[:, i : i + n_m[1]].square() / torch.diag(Hinv1)[i : i + n_m[1]].square()
                lowest = torch.topk(saliency, n_m[1] - n_m[0], dim=1, largest=False)[1]
                mask1.scatter_(1, i + lowest, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, start:end] = Q1
        W[:, end:] -= Err1.matmul(Hinv[start:end, end:])
        pruned[:, start:end] = mask1
    return W, ~(pruned | dead.unsqueeze(0).expand_as(pruned))


def least_squares_update(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    percdamp: float = 0.01,
    tolerance: float = 1e-2,
    max_iterations: int = 100,
) -> torch.Tensor:
    """The kept weights that restore a layer's outputs best, row by row: for each row ``w`` with kept entries
    ``K``, ``w'`` minimising ``(w' − w) H (w' − w)ᵀ`` with ``w'`` zero outside ``K`` (``H`` dampened as
    SparseGPT does), i.e. ``w'_K H_KK = w H_:K``. Solved for every row at once by conjugate gradients with
    the diagonal of ``H`` as preconditioner, one ``(rows, in) @ (in, in)`` product per iteration, from the
    masked weights, until the residual of every row is below ``tolerance`` times its right-hand side.

    Unlike SparseGPT's column-by-column update, which spreads a pruned weight's error only over the columns
    after it, this is the optimum for the mask (on a random 50% mask of a correlated layer, output error
    0.46 of zeroing against SparseGPT's 0.81: ``tests/test_reconstruction.py``).

    Args:
        weight (`torch.Tensor`): ``(out, in)``.
        hessian (`torch.Tensor`): ``2 X Xᵀ / n`` of the layer's inputs, ``(in, in)``.
        keep (`torch.Tensor`): bool keep-mask of ``weight``'s shape.
        percdamp (`float`, *optional*, defaults to 0.01): dampening, a fraction of the mean of ``diag(H)``.
        tolerance (`float`, *optional*, defaults to 1e-2): relative residual at which a row is solved (on
            SmolLM2-135M's layers about 10 iterations, whose output error is within 0.5% of the optimum's).
        max_iterations (`int`, *optional*, defaults to 100): at most this many iterations.

    Returns:
        `torch.Tensor`: the new float32 weight, zero outside ``keep``.
    """
    mask = keep.to(weight.device).float()
    H = hessian.float().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    scale = H.diagonal().rsqrt()  # Jacobi preconditioning: solve for D^½ x with D^-½ H D^-½
    H = H * scale.unsqueeze(0) * scale.unsqueeze(1)
    w = weight.detach().float() / scale
    b = (w @ H) * mask
    x = w * mask
    r = b - (x @ H) * mask
    p = r.clone()
    rs = r.square().sum(dim=1)
    limit = (tolerance * b.norm(dim=1)).square()
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(max_iterations):
        if bool((rs <= limit).all()):
            break
        Ap = (p @ H) * mask
        alpha = rs / (p * Ap).sum(dim=1).clamp_min(tiny)
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        new = r.square().sum(dim=1)
        p = r + (new / rs.clamp_min(tiny)).unsqueeze(1) * p
        rs = new
    return x * mask * scale


def tune_block(
    block: nn.Module,
    run: Callable[[int], torch.Tensor],
    targets: Sequence[torch.Tensor],
    weights: Sequence[nn.Parameter],
    epochs: int = 5,
    lr: float = 1e-4,
    batches_per_step: int = 1,
) -> tuple[float, float]:
    """Adam steps on the block's output error ``‖block(xᵢ) − yᵢ‖²`` (mean over entries) for ``weights``,
    every other parameter frozen; masked entries get no gradient and stay zero (their masks are applied
    first, :func:`hf_gradprune.core.masks.apply_masks`).

    Args:
        block (`nn.Module`): the block; left in eval mode.
        run (`Callable[[int], torch.Tensor]`): the block's output on calibration batch ``i``.
        targets (`Sequence[torch.Tensor]`): the dense outputs ``yᵢ`` of each batch.
        weights (`Sequence[nn.Parameter]`): the weights updated.
        epochs (`int`, *optional*, defaults to 5): passes over the batches.
        lr (`float`, *optional*, defaults to 1e-4): Adam's learning rate.
        batches_per_step (`int`, *optional*, defaults to 1): batches whose gradients make one step.

    Returns:
        `tuple[float, float]`: the mean error before and after.
    """
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)

    def error() -> float:
        with torch.no_grad():
            return sum(float((run(i) - y).square().mean()) for i, y in enumerate(targets)) / len(targets)

    try:
        before = error()
        for _ in range(epochs):
            for start in range(0, len(targets), batches_per_step):
                chosen = range(start, min(start + batches_per_step, len(targets)))
                for i in chosen:
                    ((run(i) - targets[i]).square().mean() / len(chosen)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        reapply_masks(block)
        return before, error()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
