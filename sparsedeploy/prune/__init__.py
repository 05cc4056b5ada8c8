"""Pruning: sparsity patterns, the math of each method, and (later) the registry of
methods that the `prune` command runs layer by layer."""
