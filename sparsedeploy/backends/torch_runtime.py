"""A transformers causal LM run by PyTorch as an engine session, and the dense quantized
baselines (bitsandbytes LLM.int8 and NF4) that the sparse GPU builds are compared with.

The cuda target's session is this one with a kernel plan applied. A baseline is this one
loading the dense build's weights quantized by bitsandbytes at load time, which is how
its users run it; it answers "would quantizing the dense model have served me better than
pruning it?" next to the sparse build's numbers.
"""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.backends.base import LatencySamples, Session, module_version
from sparsedeploy.errors import BadInput

QUANTIZED_BASELINES = {
    "bnb-int8": "bitsandbytes LLM.int8: int8 weights, outlier features (above 6.0) in 16-bit",
    "bnb-nf4": "bitsandbytes NF4: 4-bit NormalFloat weights in blocks of 64, double-quantized scales",
}


def bitsandbytes_missing() -> str | None:
    """Why the bitsandbytes baselines cannot run here, or None."""
    if module_version("bitsandbytes") is None:
        return "bitsandbytes is not installed: pip install 'sparsedeploy[cuda]' (or pip install bitsandbytes)"
    return None


def quantization_config(name: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if name == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise BadInput(f"unknown quantized baseline '{name}'; known: {', '.join(QUANTIZED_BASELINES)}")


class TorchSession(Session):
    """A checkpoint directory loaded by transformers on ``device`` in ``dtype`` (quantized
    at load time when ``baseline`` names one). Latency runs prefill and decode over a static
    KV cache, captured as CUDA graphs on a GPU when ``graphs`` (eagerly where a model's
    layers cannot be captured, said in ``graphs_note``)."""

    def __init__(self, directory: Path, dtype, device: str, graphs: bool = True, baseline: str | None = None):
        from transformers import AutoModelForCausalLM

        extra = {}
        if baseline is not None:
            # bitsandbytes quantizes while loading, onto the device it is given.
            extra = {"quantization_config": quantization_config(baseline, dtype), "device_map": device}
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                     **extra)
        self.model = (model if baseline is not None else model.to(device)).eval()
        self.device = device
        self.graphs = graphs
        self.graphs_note: str | None = None
        self.generations: dict[tuple[int, int, int], object] = {}

    def logits(self, window):
        import torch

        with torch.no_grad():
            output = self.model(input_ids=window[None].to(self.device), use_cache=False)
        return output.logits[0].float().cpu()

    def generation(self, batch: int, prompt_tokens: int, new_tokens: int):
        from sparsedeploy.kernels.graphs import build_generation

        key = (batch, prompt_tokens, new_tokens)
        if key not in self.generations:
            try:
                self.generations[key] = build_generation(self.model, batch, prompt_tokens, new_tokens, graphs=self.graphs)
            except RuntimeError as error:
                if not (self.graphs and self.device == "cuda"):
                    raise
                # Some quantized layers synchronize with the host (LLM.int8's outlier split), which
                # a graph cannot hold: time those eagerly, and say so.
                self.graphs_note = f"run without CUDA graphs (capture failed: {str(error).splitlines()[0][:160]})"
                self.generations[key] = build_generation(self.model, batch, prompt_tokens, new_tokens, graphs=False)
        return self.generations[key]

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        from sparsedeploy.kernels.graphs import time_prefill_decode

        return time_prefill_decode(self.generation(batch, prompt_tokens, new_tokens), runs, warmup)

    def ran_graphs(self) -> bool:
        """Whether every timed shape ran as CUDA graph replays."""
        return bool(self.generations) and all(generation.graphs for generation in self.generations.values())

    def kernels(self) -> dict:
        graphs = self.ran_graphs()
        said = "timed as CUDA graph replays" if graphs else (self.graphs_note or "timed eagerly")
        return {"sparse_kernels": "not-used", "evidence": f"dense weights in PyTorch; {said}", "cuda_graphs": graphs}

    def close(self) -> None:
        import torch

        self.generations.clear()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
