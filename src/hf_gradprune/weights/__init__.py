"""Weight pruning: criteria, weight scoring, sparsity patterns, block-by-block pruning and reconstruction."""
