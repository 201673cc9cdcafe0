"""The core every pipeline stands on: family adapters, the pruning record, weight masks, FSDP2 shards,
batches and losses, and the shared choices."""
