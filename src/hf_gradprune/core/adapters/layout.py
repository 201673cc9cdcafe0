"""Weight layouts of the module types whose weights can be pruned, on any ``nn.Module``.

One place answers "which dimension of this weight holds the outputs, which the inputs": ``nn.Linear``
stores (out, in), transformers' GPT-2 ``Conv1D`` stores (in, out), ``nn.Conv1d/2d/3d`` store
(out, in / groups, *kernel). Surgery, importance and selection ask here instead of testing types.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

#: Module types whose ``weight`` hf_gradprune can score, mask and cut.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is of a type in :data:`PRUNABLE_TYPES`."""
    return isinstance(module, PRUNABLE_TYPES)


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """``(output_dim, input_dim)`` of ``module.weight``.

    (0, 1) for ``nn.Linear`` and convolutions (the kernel dimensions follow the input channels), (1, 0)
    for transformers' ``Conv1D``.

    Example:
        >>> from torch import nn
        >>> weight_dims(nn.Linear(4, 2)), weight_dims(nn.Conv2d(3, 8, 5))
        ((0, 1), (0, 1))
    """
    if isinstance(module, Conv1D):
        return 1, 0
    if isinstance(module, (nn.Linear, *_CONVOLUTIONS)):
        return 0, 1
    raise TypeError(
        f"{type(module).__name__} is not a prunable layer: hf_gradprune prunes the weights of "
        f"{', '.join(t.__name__ for t in PRUNABLE_TYPES)}."
    )


def input_dims(module: nn.Module) -> tuple[int, ...]:
    """The dimensions of ``module.weight`` that together make one output's inputs, in memory order.

    ``(1,)`` for ``nn.Linear``, ``(0,)`` for ``Conv1D``, ``(1, 2, 3)`` for ``nn.Conv2d`` (input channels
    times kernel): the run of an N:M pattern, the row of a per-row threshold.

    Example:
        >>> from torch import nn
        >>> input_dims(nn.Conv2d(3, 8, 5))
        (1, 2, 3)
    """
    _, in_dim = weight_dims(module)
    return (in_dim, *range(2, module.weight.dim())) if isinstance(module, _CONVOLUTIONS) else (in_dim,)


def refresh_features(module: nn.Module) -> None:
    """Set the size attributes of ``module`` from its (cut) weight, so ``repr`` and ``extra_repr`` agree."""
    out_dim, in_dim = weight_dims(module)
    out_size, in_size = module.weight.shape[out_dim], module.weight.shape[in_dim]
    if isinstance(module, Conv1D):
        module.nf, module.nx = out_size, in_size
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_size, in_size
    else:
        module.out_channels, module.in_channels = out_size, in_size * module.groups


def input_channel_dim(module: nn.Module) -> int:
    """The dimension of ``module``'s input activation that holds its input channels (features)."""
    weight_dims(module)
    return 1 if isinstance(module, _CONVOLUTIONS) else -1


def per_input_channel(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``values`` of shape ``(input channels,)`` viewed to broadcast against ``module.weight``.

    A grouped convolution's output channel sees only its group's inputs: the view follows the groups.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> per_input_channel(nn.Conv2d(4, 6, 3, groups=2), torch.arange(4.0)).shape
        torch.Size([6, 2, 1, 1])
    """
    weight = module.weight
    _, in_dim = weight_dims(module)
    if isinstance(module, _CONVOLUTIONS) and module.groups > 1:
        per_group = values.view(module.groups, -1)
        per_output = per_group.repeat_interleave(weight.shape[0] // module.groups, dim=0)
        return per_output.view(*per_output.shape, *[1] * (weight.dim() - 2))
    shape = [1] * weight.dim()
    shape[in_dim] = -1
    return values.view(shape)
