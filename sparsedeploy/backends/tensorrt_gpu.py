"""TensorRT engine with 2:4 sparse weights on an NVIDIA GPU."""

from sparsedeploy.backends.base import Availability, Backend, cuda_gpu, module_version, register_backend


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    engine = "tensorrt"
    device = "cuda"

    def availability(self) -> Availability:
        version = module_version("tensorrt")
        if version is None:
            return Availability(False, "tensorrt is not installed (NVIDIA's Python wheels, with an NVIDIA GPU and driver)")
        has_gpu, detail = cuda_gpu()
        if not has_gpu:
            return Availability(False, f"tensorrt {version} is installed but {detail}")
        return Availability(True, f"tensorrt {version}, {detail}")
