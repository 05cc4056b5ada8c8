"""On-target checks: quality (perplexity, KL divergence, top-1 agreement) and, with the
build pipeline, latency."""
