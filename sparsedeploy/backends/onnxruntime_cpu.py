"""ONNX Runtime on CPU."""

from sparsedeploy.backends.base import Availability, Backend, module_version, register_backend


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    engine = "onnxruntime"
    device = "cpu"

    def availability(self) -> Availability:
        version = module_version("onnxruntime")
        if version is None:
            return Availability(False, "onnxruntime is not installed; run `make install`")
        import onnxruntime

        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            return Availability(False, f"onnxruntime {version} has no CPUExecutionProvider; reinstall onnxruntime")
        return Availability(True, f"onnxruntime {version}, CPUExecutionProvider")
