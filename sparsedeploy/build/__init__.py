"""`sparsedeploy build` and `check`: checkpoint -> (quantize) -> engine artifact -> on-target
check against the PyTorch reference and a dense build on the same engine -> bundle."""
