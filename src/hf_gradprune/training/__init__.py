"""Pruning inside the Trainer: the flags, the plan of a run, the callback, the trainer mixin and its training
state without pickle, distillation and LoRA."""
