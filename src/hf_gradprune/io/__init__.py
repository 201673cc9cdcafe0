"""Saving and sharing: strict checkpoints, vanilla exports, model cards and Hub pushes."""
