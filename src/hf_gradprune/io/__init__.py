"""Saving and sharing: strict checkpoints, vanilla exports, model cards and their figures, Hub pushes."""
