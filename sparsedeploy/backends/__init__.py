"""Target backends: one module each, registered in `base`'s registry.

Adding a target is one module here, one entry below, and one profile in `targets/`.
"""

from sparsedeploy.backends.base import (
    Availability,
    Backend,
    BuildInputs,
    BuiltArtifact,
    LatencySamples,
    Session,
    Workload,
    backend_names,
    get_backend,
    register_backend,
)

BACKEND_MODULES = ("onnxruntime_cpu", "deepsparse_cpu", "llamacpp", "torch_cuda", "tensorrt_gpu")

__all__ = ["Availability", "Backend", "BuildInputs", "BuiltArtifact", "LatencySamples", "Session", "Workload", "backend_names", "get_backend", "register_backend", "BACKEND_MODULES"]
