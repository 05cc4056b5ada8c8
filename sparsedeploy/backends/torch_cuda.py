"""PyTorch on an NVIDIA GPU with cuSPARSELt 2:4 kernels."""

from sparsedeploy.backends.base import Availability, Backend, cuda_gpu, register_backend


@register_backend
class TorchCudaBackend(Backend):
    name = "torch-cuda"
    engine = "pytorch"
    device = "cuda"

    def availability(self) -> Availability:
        import torch

        has_gpu, detail = cuda_gpu()
        if not has_gpu:
            return Availability(False, f"{detail}; this target needs an NVIDIA GPU (sm_80+) and a CUDA build of torch")
        if not torch.backends.cusparselt.is_available():
            return Availability(False, f"{detail}, but this torch {torch.__version__} has no cuSPARSELt")
        return Availability(True, f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}, {detail}")
