"""llama.cpp (GGUF) on any CPU, ARM edge devices included, through llama-cpp-python."""

from sparsedeploy.backends.base import Availability, Backend, module_version, register_backend


@register_backend
class LlamaCppBackend(Backend):
    name = "llamacpp"
    engine = "llama.cpp"
    device = "cpu"

    def availability(self) -> Availability:
        version = module_version("llama_cpp")
        if version is None:
            return Availability(False, "llama-cpp-python is not installed (it builds llama.cpp from source: pip install llama-cpp-python==0.3.36)")
        return Availability(True, f"llama-cpp-python {version}")
