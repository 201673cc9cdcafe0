"""Distillation while training: the pruned model (the student) learns the outputs, and optionally the hidden
states, of a frozen teacher (by default the model as it was before the first cut).

The loss is ``(1 − α) · task + α · (T² · KL(teacher ‖ student) + hidden)``: the KL runs over the outputs at
temperature ``T``, one row per example or per real token (a causal LM's vocabulary is reduced to the
teacher's :data:`~hf_gradprune.structured.mask_tuning.TOP_K` most likely tokens plus the rest's mass, as mask
tuning does, so memory stays bounded); ``hidden`` is the mean squared error of each kept layer's output
against the teacher's layer it was (whole layers removed are skipped through the pruning record).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.masks import is_masked, remove_masks
from ..core.record import PruningRecord
from ..structured.mask_tuning import TOP_K, coarse


def output_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    top_k: int = TOP_K,
) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` of two models' logits, the mean over rows (examples, or real tokens of
    sequence outputs where ``attention_mask`` is 1); the squared error for a single output (regression).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(output_divergence(logits, logits))
        0.0
        >>> round(float(output_divergence(torch.zeros(1, 3), logits, temperature=2.0)), 4)  # T² KL
        0.7706
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"The student's logits {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ: "
            "distillation needs the same outputs (the same head and vocabulary)."
        )
    if student.dim() == 3 and attention_mask is not None and attention_mask.shape == student.shape[:2]:
        keep = attention_mask.bool()
        student, teacher = student[keep], teacher[keep]
    student = student.reshape(-1, student.shape[-1]).float()
    teacher = teacher.reshape(-1, teacher.shape[-1]).float()
    if student.shape[-1] == 1:
        return (student - teacher).square().mean()
    wanted = (teacher / temperature).log_softmax(-1)
    rows = (student / temperature).log_softmax(-1)
    if wanted.shape[-1] > top_k + 1:
        chosen = wanted.topk(top_k, dim=-1).indices
        wanted, rows = coarse(wanted, chosen), coarse(rows, chosen)
    return temperature**2 * (wanted.exp() * (wanted - rows)).sum(-1).mean()


def hidden_state_distance(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    kept_layers: list[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the student's layer outputs against the teacher's layers they were.

    ``student`` and ``teacher`` are ``output_hidden_states`` (the embeddings first, then one entry per
    layer, the last after any final norm); ``kept_layers[i]`` is the teacher layer that the student's layer
    ``i`` was. The embeddings and the last entries are compared as they are; padding (``attention_mask`` 0)
    is left out.
    """
    if len(student) != len(kept_layers) + 1:
        raise ValueError(
            f"The student has {len(student) - 1} layer outputs but the record keeps {len(kept_layers)} "
            "layers."
        )
    pairs = [(0, 0), *((i + 1, kept + 1) for i, kept in enumerate(kept_layers[:-1])), (-1, -1)]
    keep = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        difference = (student[s].float() - teacher[t].float()).square()
        total = total + (difference[keep] if keep is not None else difference).mean()
    return total / len(pairs)


@dataclass
class DistillationParts:
    """What a distillation step's loss is made of (detached), for the logs."""

    task: float
    kl: float
    hidden: float | None


class Distiller:
    """A frozen teacher and the distillation loss of a student against it.

    Args:
        teacher (`nn.Module`): the teacher; it is put in eval mode with gradients off (weight masks, if any,
            stay as they are: a copy of a masked model keeps its zeros).
        alpha (`float`): weight of the distillation term, in (0, 1].
        temperature (`float`, *optional*, defaults to 2.0): the softmax temperature of the KL term.
        hidden_states (`bool`, *optional*, defaults to `False`): add the per-layer hidden-state error.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> distiller = Distiller(frozen_copy(model), alpha=0.5, hidden_states=True)
        >>> inputs = distiller.inputs({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])})
        >>> outputs = model.eval()(**inputs)
        >>> loss, parts = distiller.loss(model, outputs["loss"], outputs, inputs)
        >>> parts.kl == 0.0 and parts.hidden == 0.0  # the student is still the teacher
        True
    """

    def __init__(
        self, teacher: nn.Module, alpha: float, temperature: float = 2.0, hidden_states: bool = False
    ):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.hidden_states = alpha, temperature, hidden_states

    def inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The student's ``inputs`` with what distillation reads of its outputs asked for."""
        return {**inputs, "output_hidden_states": True} if self.hidden_states else dict(inputs)

    def loss(
        self, student: nn.Module, task: torch.Tensor, outputs: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, DistillationParts]:
        """The training loss of ``student`` whose task loss on ``inputs`` (from :meth:`inputs`) is ``task``
        and outputs ``outputs``, and its parts."""
        teacher_inputs = {k: v for k, v in self.inputs(inputs).items() if k != "labels"}
        with torch.no_grad():
            wanted = self.teacher(**teacher_inputs)
        mask = inputs.get("attention_mask")
        kl = output_divergence(outputs["logits"], wanted["logits"], self.temperature, mask)
        distilled, hidden = kl, None
        if self.hidden_states:
            kept = self._teacher_layers(
                student, len(outputs["hidden_states"]) - 1, len(wanted["hidden_states"]) - 1
            )
            hidden = hidden_state_distance(outputs["hidden_states"], wanted["hidden_states"], kept, mask)
            distilled = distilled + hidden
        loss = (1 - self.alpha) * task + self.alpha * distilled
        parts = DistillationParts(
            float(task.detach()), float(kl.detach()), None if hidden is None else float(hidden.detach())
        )
        return loss, parts

    def _teacher_layers(self, student: nn.Module, depth: int, teacher_depth: int) -> list[int]:
        """The teacher's position of each of the student's ``depth`` layers, through both pruning records."""
        original = PruningRecord.from_config(getattr(student, "config", None)).original_layers(depth)
        theirs = PruningRecord.from_config(getattr(self.teacher, "config", None)).original_layers(
            teacher_depth
        )
        missing = sorted(set(original) - set(theirs))
        if missing:
            raise ValueError(
                "`--distill_hidden_states` pairs each layer with the teacher's, but the teacher has no "
                f"layer {missing} (of the original model): distil from a teacher with every layer the "
                "student keeps."
            )
        return [theirs.index(layer) for layer in original]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to distil from or time against: same weights, dtype and device, in eval mode,
    gradients off, without weight-mask hooks (its masked weights are already zero) and running its class's
    own ``forward``: a ``forward`` a trainer set on the instance (trl's fused LM head calls the original
    object, so a plain ``deepcopy`` would run the student) is not copied; accelerate's device hooks are.

    Example:
        >>> import functools, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> model.forward = functools.partial(torch.nn.Linear.forward, model)  # patched on the instance
        >>> "forward" in vars(frozen_copy(model))
        False
    """
    teacher = copy.deepcopy(model)
    for module in teacher.modules():
        if "forward" in vars(module) and not hasattr(module, "_hf_hook"):
            del module.forward
    if is_masked(teacher):
        remove_masks(teacher)
    return teacher.eval().requires_grad_(False)
