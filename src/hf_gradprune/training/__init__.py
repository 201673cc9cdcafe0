"""Pruning inside the Trainer: the flags, the plan of a run, the callback, the trainer mixin, distillation
and LoRA."""
