"""Structured pruning: gates, unit importance, selection, the FLOPs budget, surgery, rounds and mask
tuning."""
