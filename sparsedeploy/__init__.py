"""sparsedeploy: prune an LLM checkpoint, build it for a sparse inference engine, and
check on the target that it is faster than dense and still good.

The package reads top-down as the pipeline:
models -> data -> prune -> (quantize) -> backends -> checks -> (report/bundle) -> cli.
"""

__version__ = "0.1.0"
