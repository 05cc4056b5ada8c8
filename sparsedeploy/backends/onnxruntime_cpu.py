"""ONNX Runtime on CPU: the exported decoder, in FP32, INT8 or INT4 weight-only.

ONNX Runtime's CPU kernels for MatMul, MatMulInteger and MatMulNBits are dense: a
pruned weight's zeros are multiplied like any other value. Sparsity alone buys no
speed here; structure (fewer layers, heads, channels) and quantization do. The report
says so instead of letting a user hope otherwise.
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
    calibration_settings,
    module_version,
    register_backend,
    time_generation,
    whole_number,
)
from sparsedeploy.errors import BadInput
from sparsedeploy.export.gptq import GPTQ_METHOD, GPTQ_NSAMPLES, gptq_copy
from sparsedeploy.export.last_position import LAST_GRAPH, write_last_position_graph
from sparsedeploy.export.onnx_decoder import past_dtype
from sparsedeploy.export.smoothing import smoothed_if_asked, smoothquant_alpha

# Which ONNX Runtime quantizer each precision uses unless the profile's [build] table
# names another (`int8_scheme = "int8-static-qdq"`).
DEFAULT_SCHEMES = {"int8": "int8-dynamic", "int4": "int4-weight-only"}
INT8_SCHEMES = ("int8-dynamic", "int8-static-qdq")
DEFAULT_OPSET = 17
DEFAULT_INT4_BLOCK = 32


def int4_gptq(option) -> bool:
    """A profile's ``int4_gptq``: absent -> True (GPTQ before the 4-bit quantizer)."""
    if option is None:
        return True
    if not isinstance(option, bool):
        raise BadInput(f"int4_gptq in [build] must be true or false, not {option!r}; true (the default) runs GPTQ")
    return option


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

    def engine_version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        settings = {"precision": precision, "opset": whole_number(options, "opset", DEFAULT_OPSET, minimum=1),
                    "latency_graph": LAST_GRAPH}
        if precision == "int8":
            scheme = options.get("int8_scheme", DEFAULT_SCHEMES["int8"])
            if scheme not in INT8_SCHEMES:
                raise BadInput(f"int8_scheme '{scheme}' in the target profile is unknown; use one of {', '.join(INT8_SCHEMES)}")
            settings["scheme"] = scheme
            # Every int8 scheme scales activations per tensor: SmoothQuant first.
            settings["smoothquant_alpha"] = smoothquant_alpha(options.get("smoothquant_alpha"))
            if scheme == "int8-static-qdq" or settings["smoothquant_alpha"] is not None:
                settings["calibration"] = calibration_settings(options)
        elif precision == "int4":
            settings["scheme"] = DEFAULT_SCHEMES["int4"]
            settings["block_size"] = whole_number(options, "int4_block_size", DEFAULT_INT4_BLOCK, minimum=2)
            settings["gptq"] = int4_gptq(options.get("int4_gptq"))
            if settings["gptq"]:
                # GPTQ estimates a Hessian per linear (1536 x 1536 for the default model's
                # down projections): it needs more tokens than smoothing does.
                nsamples = whole_number(options, "int4_gptq_nsamples", GPTQ_NSAMPLES, minimum=1)
                settings["calibration"] = calibration_settings(options, nsamples)
                settings["gptq_method"] = GPTQ_METHOD
        elif precision != "fp32":
            raise BadInput(f"onnxruntime builds fp32, int8 or int4, not {precision}; pass --quant none, int8 or int4")
        return settings

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        from sparsedeploy.export.onnx_decoder import MODEL_FILE, export_decoder

        settings = self.build_settings(inputs.precision, inputs.workload, inputs.options)
        if inputs.precision == "fp32":
            exported = export_decoder(inputs.model, output_dir, opset=settings["opset"])
            details = {"export": _export_details(exported), **_last_graph(output_dir)}
            return BuiltArtifact(output_dir, MODEL_FILE, "fp32", exported.sparsity, details)

        from sparsedeploy.export.onnx_quantize import calibration_feeds_from_windows, quantize_onnx

        model, smoothing = smoothed_if_asked(inputs.model, settings.get("smoothquant_alpha"), inputs.calibration)
        gptq = None
        if settings.get("gptq"):
            if inputs.calibration is None:
                raise BadInput("GPTQ needs calibration text; set calib in the profile's [build] table, or int4_gptq = false")
            model, gptq = gptq_copy(model, inputs.calibration(), settings["block_size"])
        with tempfile.TemporaryDirectory(prefix=".export-", dir=output_dir.parent) as scratch:
            exported = export_decoder(model, Path(scratch) / "fp32", opset=settings["opset"])
            feeds = None
            if settings["scheme"] == "int8-static-qdq":
                if inputs.calibration is None:
                    raise BadInput("static INT8 needs calibration text; set calib in the profile's [build] table")
                feeds = calibration_feeds_from_windows(inputs.calibration(), exported.path)
            quantized = quantize_onnx(
                exported.path, output_dir, settings["scheme"], calibration_feeds=feeds,
                block_size=settings.get("block_size", DEFAULT_INT4_BLOCK),
            )
        quantization = {key: value for key, value in quantized.describe().items() if key != "sparsity"}
        if smoothing is not None:
            quantization["smoothing"] = smoothing
        if gptq is not None:
            on_grid = quantization["settings"]["weights_on_given_grid"]
            if on_grid != quantization["settings"]["quantized_nodes"]:
                raise RuntimeError(f"internal error: only {on_grid} of {quantization['settings']['quantized_nodes']} "
                                   "GPTQ weights reached the 4-bit quantizer on their grid; the export changed them")
            quantization["gptq"] = gptq
        details = {"export": _export_details(exported), "quantization": quantization, **_last_graph(output_dir)}
        return BuiltArtifact(output_dir, MODEL_FILE, inputs.precision, quantized.sparsity, details)

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        timed = artifact.directory / LAST_GRAPH
        return OnnxRuntimeSession(artifact.directory / artifact.main_file, workload.threads,
                                  timed_path=timed if timed.exists() else None)


def _last_graph(output_dir: Path) -> dict:
    from sparsedeploy.export.onnx_decoder import MODEL_FILE

    checked = write_last_position_graph(output_dir / MODEL_FILE, output_dir / LAST_GRAPH)
    return {"graphs": {"full": MODEL_FILE, "latency": LAST_GRAPH}, "last_graph": checked}


def _export_details(exported) -> dict:
    return {
        "exporter": "torch.onnx (TorchScript)",
        "opset": exported.opset,
        "ir_version": exported.ir_version,
        "seconds": round(exported.seconds, 1),
        "max_abs_diff_vs_torch": exported.max_abs_diff,
        "float_sparsity": exported.sparsity["sparsity"],
    }


class OnnxRuntimeSession(Session):
    """Quality windows run on the full graph (logits at every position); latency is timed
    on ``timed_path``, the last-position graph, when the artifact has one."""

    def __init__(self, path: Path, threads: int, timed_path: Path | None = None):
        self.path = path
        self.threads = threads
        self.timed_path = timed_path
        self.session = self._open(path)
        self.timed_session = None
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        first_past = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = int(first_past.shape[1]), int(first_past.shape[3])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.past_dtype = past_dtype(self.session)

    def _open(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _empty_past(self, batch: int) -> dict:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
        return {name: empty for name in self.past_names}

    def _feeds(self, input_ids: np.ndarray, past: dict, past_length: int) -> dict:
        batch, seq = input_ids.shape
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past_length, past_length + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }

    def logits(self, window):
        import torch

        ids = np.ascontiguousarray(window.numpy().astype(np.int64)[None])
        if self.session is None:
            self.timed_session = None
            self.session = self._open(self.path)
        (logits,) = self.session.run(["logits"], self._feeds(ids, self._empty_past(1), 0))
        return torch.from_numpy(logits[0].astype(np.float32, copy=False))

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        if self.timed_path is not None and self.timed_session is None:
            self.session = None  # one copy of the weights in memory at a time
            self.timed_session = self._open(self.timed_path)
        session = self.timed_session or self.session
        output_names = [o.name for o in session.get_outputs()]
        prompt = np.random.default_rng(0).integers(0, self.vocab, size=(batch, prompt_tokens), dtype=np.int64)

        def step(input_ids: np.ndarray, past: dict, past_length: int):
            outputs = session.run(output_names, self._feeds(input_ids, past, past_length))
            next_ids = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
            presents = dict(zip(self.past_names, outputs[1:]))
            return next_ids, presents, past_length + input_ids.shape[1]

        def prefill():
            return step(prompt, self._empty_past(batch), 0)

        def decode(state):
            return step(*state)

        return time_generation(prefill, decode, new_tokens, runs, warmup)

    def kernels(self) -> dict:
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        counts: dict[str, int] = {}
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul"):
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        ops = ", ".join(f"{count} {op}" for op, count in sorted(counts.items()))
        return {
            "sparse_kernels": "not-used",
            "evidence": f"ONNX Runtime's CPU execution provider has only dense kernels for the graph's matrix products ({ops}); "
                        "pruned zeros are multiplied like any other weight",
            "matmul_ops": counts,
        }

    def close(self) -> None:
        self.session = self.timed_session = None
