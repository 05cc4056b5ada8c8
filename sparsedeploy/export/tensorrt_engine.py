"""The TensorRT-specific stages: from the shared ONNX export to an engine with 2:4 sparse
weights, and what the engine says about the kernels it picked.

Stages, in order (every one before ``build_engine`` is plain Python and runs without a GPU):

1. ``check_compute_capability``: the GPU can run the precision (sm_80+ for 2:4 sparse
   tensor cores, sm_89+ for FP8).
2. The shared exporter writes a float16 graph (``onnx_decoder.export_decoder`` with
   ``dtype=torch.float16``, verified against the float32 model in ONNX Runtime); for INT8
   / FP8, ``explicit_quantization`` adds Q/DQ pairs from ranges measured in PyTorch.
3. ``check_sparse_orientation``: every pruned weight holds its 2:4 groups along the
   GEMM's K (input) axis, the axis TensorRT's sparse tactics need, measured in the graph
   TensorRT compiles (float16, int8 or float8 weights).
4. ``quality_profile`` / ``latency_profiles``: optimization profile shapes from the workload.
5. ``build_engine`` (needs tensorrt and a GPU): parse into a strongly typed network,
   SPARSE_WEIGHTS, profiles, timing cache, DETAILED profiling verbosity, serialize.
6. ``parse_engine_information`` / ``kernel_evidence``: the engine inspector's JSON as
   per-layer records and the "sparse kernels used?" answer, only from what it says.

Why strongly typed (precision in the graph, no FP16 / INT8 / FP8 builder flags):
TensorRT 11 removed those flags (10.12 deprecated them), so a "weakly typed" FP32 graph
with the FP16 flag does not build there at all. A float16 graph traced from PyTorch's own
half-precision model keeps PyTorch's float32 islands (norms, rotary tables, softmax), so
the engine computes what PyTorch in float16 computes, on TensorRT 10 and 11 alike.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sparsedeploy.errors import BadInput, TargetUnavailable

PLAN_FILE = "model.plan"  # the latency engine: prefill + decode profiles, last-position logits
QUALITY_PLAN = "quality.plan"  # logits at every position of one window, for the quality check
ONNX_DIR = "onnx"  # the graphs the engines were built from (portable: rebuild on another GPU)
PRECISIONS = ("fp16", "int8", "fp8")
MIN_SPARSE_CAPABILITY = (8, 0)  # Ampere: first 2:4 sparse tensor cores
FP8_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores; TensorRT builds FP8 there
DEFAULT_OPSET = 17  # float16 graphs; Q/DQ graphs need explicit_quantization.QDQ_OPSET
# The only builder flag: precision lives in the (strongly typed) graph.
BUILDER_FLAGS = ("SPARSE_WEIGHTS",)
# Below this share of zeros a weight is simply dense (a 2:4 weight has at least 50%).
DENSE_BELOW = 0.5


# -- 1. precision against the GPU --------------------------------------------------


def check_compute_capability(precision: str, capability: tuple[int, int], device: str = "the GPU") -> None:
    """Refuse a GPU that cannot run sparse tensor cores (TargetUnavailable, exit 3) or a
    precision it lacks (BadInput, exit 2). Takes the capability, so it tests on any machine."""
    if precision not in PRECISIONS:
        raise BadInput(f"the tensorrt target builds {', '.join(PRECISIONS)}, not {precision}; pick one of those in the profile")
    major, minor = capability
    if (major, minor) < MIN_SPARSE_CAPABILITY:
        raise TargetUnavailable(f"{device} (sm_{major}{minor}) has no 2:4 sparse tensor cores; TensorRT sparse builds need sm_80 or newer")
    if precision == "fp8" and (major, minor) < FP8_CAPABILITY:
        raise BadInput(f"{device} (sm_{major}{minor}) has no FP8 tensor cores (sm_89+: Ada, Hopper); build fp16 or int8 instead")


def builder_flags(precision: str) -> tuple[str, ...]:
    """Names of the ``tensorrt.BuilderFlag`` members a build sets (the same for every
    precision: the graph carries it)."""
    if precision not in PRECISIONS:
        raise BadInput(f"the tensorrt target builds {', '.join(PRECISIONS)}, not {precision}; pick one of those in the profile")
    return BUILDER_FLAGS


def graph_opset(precision: str, asked: int | None) -> int:
    """The ONNX opset to export at: the profile's, or the default; Q/DQ with float16
    scales (INT8 / FP8) needs opset 19."""
    from sparsedeploy.export.explicit_quantization import QDQ_OPSET

    needed = QDQ_OPSET if precision in ("int8", "fp8") else None
    if asked is None:
        return needed or DEFAULT_OPSET
    if needed and int(asked) < needed:
        raise BadInput(f"{precision} needs ONNX opset {needed} or newer (float16 Q/DQ), the profile sets {asked}; raise opset in [build]")
    return int(asked)


# -- 2. the graphs: float16 export, Q/DQ for INT8 and FP8 --------------------------


@dataclass
class PreparedGraphs:
    """What ``prepare_graphs`` wrote into ``directory``: the graph of every position's
    logits (``full``) and the last-position graph that shares its weights (``last``)."""

    directory: Path
    full: Path
    last: Path
    sparsity: dict  # initializer_sparsity of the graph TensorRT compiles
    orientation: dict  # check_sparse_orientation's summary
    export: dict
    quantization: dict | None
    last_graph: dict


def prepare_graphs(model, directory: Path, precision: str, opset: int, calibration=None,
                   smoothquant_alpha: float | None = None) -> PreparedGraphs:
    """Everything before TensorRT: the float16 export (Q/DQ added for int8 / fp8 from
    ranges measured on ``calibration()`` windows; for int8, after SmoothQuant with
    ``smoothquant_alpha`` unless None: INT8 activations are per tensor, while FP8's
    exponent holds the outliers and its KL rose slightly when smoothed), the 2:4
    orientation check on the graph to be compiled, and the last-position graph for
    timing. ``directory`` must not exist yet."""
    import tempfile

    import torch

    from sparsedeploy.export.explicit_quantization import activation_ranges, quantize_graph
    from sparsedeploy.export.last_position import LAST_GRAPH, write_last_position_graph
    from sparsedeploy.export.onnx_decoder import MODEL_FILE, export_decoder, initializer_sparsity
    from sparsedeploy.export.smoothing import smoothed_if_asked
    from sparsedeploy.kernels.semi_structured import named_linears

    builder_flags(precision)  # an unknown precision is BadInput before anything is exported
    directory = Path(directory)
    quantization = None
    if precision == "fp16":
        exported = export_decoder(model, directory, opset=opset, dtype=torch.float16)
        sparsity = exported.sparsity
    else:
        if calibration is None:
            raise BadInput(f"{precision} needs calibration text; set calib in the tensorrt profile's [build] table")
        windows = calibration()
        started = time.perf_counter()
        model, smoothing = smoothed_if_asked(model, smoothquant_alpha if precision == "int8" else None, lambda: windows)
        ranges = activation_ranges(model, windows, named_linears(model))
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=directory.parent) as scratch:
            exported = export_decoder(model, Path(scratch) / "fp16", opset=opset, dtype=torch.float16)
            quantization = quantize_graph(exported.path, directory / MODEL_FILE, precision, ranges,
                                          keep_float=_float_nodes(exported.path, precision))
        quantization.update(calibration_samples=int(windows.shape[0]), smoothing=smoothing,
                            seconds=round(time.perf_counter() - started, 1))
        sparsity = initializer_sparsity(directory / MODEL_FILE)
    full = directory / MODEL_FILE
    orientation = check_sparse_orientation(sparse_orientation(full, sparsity), full.name)
    last_graph = write_last_position_graph(full, directory / LAST_GRAPH)
    export = {"exporter": "torch.onnx (TorchScript)", "dtype": exported.dtype, "opset": exported.opset,
              "seconds": round(exported.seconds, 1), "max_abs_diff_vs_torch_fp32": exported.max_abs_diff,
              "num_layers": exported.num_layers, "kv_heads": exported.kv_heads, "head_dim": exported.head_dim}
    return PreparedGraphs(directory, full, directory / LAST_GRAPH, sparsity, orientation, export, quantization, last_graph)


def _float_nodes(graph: Path, precision: str) -> set[str]:
    """Linear nodes left float16: the LM head (dense anyway, and the logits' precision is
    what quality is judged on); for INT8 the MLP down projections too (their outlier
    activations, see onnx_quantize.FLOAT_LAYERS), while FP8's exponent holds them.
    Smoothing cannot rescue INT8 there: with SmoothQuant folded through up_proj's output
    rows (act(gate) * up is linear in up), quantizing down_proj took the dense default
    model's KL from 0.022 to 0.26 at alpha 0.5, 0.13 at 0.8, 0.24 at 0.95 (WikiText-2)."""
    import onnx

    from sparsedeploy.export.onnx_quantize import lm_head_nodes, mlp_down_nodes

    proto = onnx.load(str(graph), load_external_data=False)
    return set(lm_head_nodes(proto)) | (set(mlp_down_nodes(proto)) if precision == "int8" else set())


# -- 3. 2:4 orientation ---------------------------------------------------------------


def sparse_orientation(onnx_path: Path, sparsity: dict | None = None) -> list[dict]:
    """One record per linear weight of the graph: ``{name, shape, input_axis, zero_fraction,
    along_k, along_n, verdict}``; compliance with 2:4 along K (the GEMM's input axis,
    read from the graph by ``initializer_sparsity``) and, for sparse weights that fail
    there, along N. verdict: "2:4" (sparse tactics can take it), "dense", "transposed"
    (2:4 along N: the groups lie across the wrong axis), "not-2:4" (sparse, no 2:4)."""
    from sparsedeploy.export.onnx_decoder import initializer_sparsity

    report = sparsity if sparsity is not None else initializer_sparsity(onnx_path)
    records, failing = [], []
    for entry in report["linear_weights"]:
        along_k = entry["compliance"]["2:4"]
        record = {"name": entry["name"], "shape": entry["shape"], "input_axis": entry["input_axis"],
                  "zero_fraction": entry["zero_fraction"], "along_k": along_k, "along_n": None}
        if along_k == 1.0:
            record["verdict"] = "2:4"
        elif entry["zero_fraction"] < DENSE_BELOW:
            record["verdict"] = "dense"
        else:
            failing.append((record, entry))
        records.append(record)
    if failing:
        arrays = _initializer_arrays(onnx_path, [entry["name"] for _, entry in failing])
        for record, entry in failing:
            record["along_n"] = _compliance_along_n(arrays[entry["name"]], entry)
            record["verdict"] = "transposed" if record["along_n"] == 1.0 else "not-2:4"
    return records


def check_sparse_orientation(records: list[dict], onnx_path: Path | str = "the exported graph") -> dict:
    """Refuse (BadInput) a graph in which a pruned weight's 2:4 groups are not along K;
    else a summary for the artifact's record."""
    transposed = [r["name"] for r in records if r["verdict"] == "transposed"]
    if transposed:
        raise BadInput(
            f"{len(transposed)} weight(s) of {onnx_path} are 2:4 along the output axis, not the input (K) axis "
            f"TensorRT's sparse tactics need (first: {transposed[0]}); prune along the input dimension "
            "(`sparsedeploy prune ... --pattern 2:4` does) or fix the export's transpose"
        )
    broken = [r["name"] for r in records if r["verdict"] == "not-2:4"]
    if broken:
        raise BadInput(
            f"{len(broken)} sparse weight(s) of {onnx_path} are not 2:4 along the input (K) axis (first: {broken[0]}); "
            "prune the checkpoint again with `sparsedeploy prune ... --pattern 2:4`"
        )
    eligible = [r for r in records if r["verdict"] == "2:4"]
    return {"weights": len(records), "two_four_along_k": len(eligible), "dense": len(records) - len(eligible)}


def _initializer_arrays(onnx_path: Path, names: list[str]) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=True)
    wanted = set(names)
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer if init.name in wanted}


def _compliance_along_n(stored: np.ndarray, entry: dict) -> float:
    from sparsedeploy.prune.patterns import nm_compliance, parse_nm

    zero_point = (entry.get("quantization") or {}).get("zero_point") or 0
    nonzero = stored.astype(np.float64) != zero_point
    # nm_compliance groups along columns: put the OUTPUT axis there.
    rows_in = nonzero if entry["input_axis"] == 0 else nonzero.T
    return nm_compliance(rows_in, parse_nm("2:4"))


# -- 4. optimization profiles -------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shape."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(data["name"], {k: tuple(tuple(s) for s in v) for k, v in data["shapes"].items()})


def _profile(name: str, num_layers: int, kv_heads: int, head_dim: int, batch, seq, past) -> Profile:
    """batch, seq, past: (min, opt, max) each; total_seq = past + seq."""
    total = tuple(p + s for p, s in zip(past, seq))
    shapes = {
        "input_ids": tuple((b, s) for b, s in zip(batch, seq)),
        "attention_mask": tuple((b, t) for b, t in zip(batch, total)),
        "position_ids": tuple((b, s) for b, s in zip(batch, seq)),
    }
    for layer in range(num_layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{layer}.{kind}"] = tuple((b, kv_heads, p, head_dim) for b, p in zip(batch, past))
    return Profile(name, shapes)


def _check_workload(workload) -> None:
    if workload.prompt_tokens < 1 or workload.new_tokens < 1 or not workload.batches or min(workload.batches) < 1:
        raise BadInput("the tensorrt profile's [check.latency] needs prompt_tokens, new_tokens and every batch >= 1; fix the profile")


def latency_profiles(workload, num_layers: int, kv_heads: int, head_dim: int) -> list[Profile]:
    """Profile 0, prefill: past 0, up to ``prompt_tokens`` new tokens. Profile 1, decode:
    one token onto a past of 1 .. P+G-1 (the last of G decode steps after a P-token
    prefill), so total_seq reaches P+G. Batch 1 .. the largest timed batch; TensorRT
    tunes its tactics at opt, which is the first timed batch (the report's headline row)
    and, for decode, the middle of the generation."""
    _check_workload(workload)
    prompt, new = workload.prompt_tokens, workload.new_tokens
    batch = (1, workload.batches[0], max(workload.batches))
    prefill = _profile("prefill", num_layers, kv_heads, head_dim, batch, (1, prompt, prompt), (0, 0, 0))
    decode = _profile("decode", num_layers, kv_heads, head_dim, batch, (1, 1, 1), (1, prompt + new // 2, prompt + new - 1))
    return [prefill, decode]


def quality_profile(workload, num_layers: int, kv_heads: int, head_dim: int) -> Profile:
    """One window from an empty cache: batch 1, 1 .. eval_seqlen tokens, past 0."""
    if workload.eval_seqlen < 1:
        raise BadInput("the tensorrt profile's [check.quality] seqlen must be >= 1; fix the profile")
    seqlen = workload.eval_seqlen
    return _profile("quality", num_layers, kv_heads, head_dim, (1, 1, 1), (1, seqlen, seqlen), (0, 0, 0))


def fits(profile: Profile, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether concrete input shapes lie inside the profile's [min, max] ranges."""
    for name, shape in shapes.items():
        low, _, high = profile.shapes[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            return False
    return True


# -- 5. engine building (tensorrt, GPU) -----------------------------------------------


def timing_cache_path(tensorrt_version: str, device_name: str, capability: tuple[int, int]) -> Path:
    """One timing cache per TensorRT version and GPU model, under the sparsedeploy cache:
    tactic timings are only valid for the GPU and the TensorRT that measured them."""
    from sparsedeploy.models.default import cache_root

    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "gpu"
    return cache_root() / "tensorrt" / f"timing-{tensorrt_version}-{slug}-sm{capability[0]}{capability[1]}.cache"


@dataclass
class EngineBuild:
    plan: Path
    seconds: float
    flags: tuple[str, ...]
    profiles: list[dict]
    sparsity_log: dict  # parse_sparsity_log of the builder's messages
    timing_cache: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["plan"] = self.plan.name
        return data


def build_engine(onnx_path: Path, plan_path: Path, precision: str, profiles: list[Profile], cache_path: Path) -> EngineBuild:
    """Parse ``onnx_path`` (external data beside it) into a strongly typed network (the
    graph's float16 / Q/DQ types are the engine's), build with 2:4 sparse weights and one
    optimization profile per entry of ``profiles``, write the plan. Needs tensorrt
    (10.x or 11.x) and a GPU."""
    import tensorrt as trt
    from filelock import FileLock

    logger = recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInput(f"TensorRT could not parse {onnx_path.name} ({errors[:300]}); report the graph with `sparsedeploy inspect`")
    config = builder.create_builder_config()
    flags = builder_flags(precision)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    # DETAILED: the engine inspector then reports each layer's tactic (kernel) name.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        if config.add_optimization_profile(optimization) < 0:  # -1, not an exception
            raise BadInput(f"TensorRT refused the {profile.name} optimisation profile {profile.shapes} "
                           f"({logger.last_error()}); check the latency workload in the target profile")

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_path) + ".lock"):
        timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if not config.set_timing_cache(timing, ignore_mismatch=False):
            from sparsedeploy.ui import info

            info(f"      the timing cache {cache_path} was written on another GPU or TensorRT; starting a new one")
        started = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - started
        if plan is None:
            raise BadInput(f"TensorRT could not build an engine from {onnx_path.name} ({logger.last_error()}); see the log above")
        staged = cache_path.with_suffix(".partial")
        staged.write_bytes(memoryview(config.get_timing_cache().serialize()))
        staged.replace(cache_path)  # a crash mid-write never leaves a torn cache
    plan_path.write_bytes(memoryview(plan))
    return EngineBuild(plan_path, seconds, flags, [p.to_dict() for p in profiles], parse_sparsity_log(logger.messages), str(cache_path))


def network_flags(trt) -> int:
    """``create_network``'s flags: STRONGLY_TYPED (needed on TensorRT 10, where networks
    are weakly typed by default and a float16 graph without the FP16 flag may run in
    float32; 11 keeps the flag and ignores it, every network being strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise TargetUnavailable("this tensorrt has no NetworkDefinitionCreationFlag.STRONGLY_TYPED (older than 9.1); "
                                "`pip install -U tensorrt` (10 or newer)")
    return 1 << int(flag)


def recording_logger(trt):
    """A ``tensorrt.ILogger`` that keeps INFO and worse (the "(Sparsity)" summary lines
    are INFO) and forwards warnings and errors to sparsedeploy's stderr."""
    from sparsedeploy.ui import info

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= int(trt.ILogger.Severity.INFO):
                self.messages.append(msg)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if level <= int(trt.ILogger.Severity.WARNING):
                info(f"      tensorrt: {msg}")

        def last_error(self) -> str:
            return self.errors[-1][:300] if self.errors else "no error message"

    return RecordingLogger()


_SPARSITY_LINE = re.compile(r"\(Sparsity\)\s*(Layers eligible for sparse math|TRT inference plan picked sparse implementation for layers):\s*(.*)")


def parse_sparsity_log(messages: list[str]) -> dict:
    """The builder's two "(Sparsity)" summary lines as layer-name lists:
    ``{"eligible": [...], "picked": [...]}`` (empty lists when absent)."""
    found = {"eligible": [], "picked": []}
    for message in messages:
        match = _SPARSITY_LINE.search(message)
        if match:
            key = "eligible" if match.group(1).startswith("Layers eligible") else "picked"
            found[key] += [name.strip() for name in match.group(2).split(",") if name.strip()]
    return found


# -- 6. what the engine inspector says -------------------------------------------------


# Layer types of matrix products in the inspector's JSON (CaskConvolution,
# CaskGemmConvolution, CaskFlattenConvolution, CublasConvolution, CaskGemmMatrixMultiply,
# ...): TensorRT runs a MatMul with constant weights as a GEMM or as a 1x1 convolution.
_GEMM_TYPES = re.compile(r"convolution|matrixmultiply|gemm|fullyconnected", re.IGNORECASE)
_GEMM_PARAMETERS = {"Convolution", "Deconvolution", "MatrixMultiply", "FullyConnected"}
# Sparse tensor-core kernels name it: "..._sparse_conv_..." / "..._sptensor16x8x32_...".
_SPARSE_TACTIC = re.compile(r"sparse|sptensor", re.IGNORECASE)
_PROFILE_SUFFIX = re.compile(r"\s*\[profile (\d+)\]\s*$")


def parse_engine_information(text: str) -> list[dict]:
    """``get_engine_information(LayerInformationFormat.JSON)`` as per-layer records:
    ``{name, type, profile, tactic, gemm, sparse_tactic, sparse_weights, opaque}``.
    ``tactic`` is the kernel name (None when the engine was built without DETAILED
    verbosity); ``sparse_weights``: the inspector's HasSparseWeights (None if absent);
    ``opaque``: a Myelin foreign node, whose inner layers the inspector does not show
    (with DETAILED verbosity TensorRT 10 lists Myelin's inner kernels instead: ``gemm`` /
    ``kgen`` layers with a TacticName and no TacticValue or HasSparseWeights)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInput(f"the engine inspector's output is not JSON ({error}); rebuild the engine with this version") from None
    layers = data.get("Layers", []) if isinstance(data, dict) else data
    records = []
    for layer in layers:
        if isinstance(layer, str):  # LAYER_NAMES_ONLY: a name and nothing else
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        match = _PROFILE_SUFFIX.search(name)
        layer_type = str(layer.get("LayerType", ""))
        tactic = layer.get("TacticName")
        gemm = bool(_GEMM_TYPES.search(layer_type)) or layer.get("ParameterType") in _GEMM_PARAMETERS
        has_sparse = layer.get("HasSparseWeights")
        records.append({
            "name": _PROFILE_SUFFIX.sub("", name),
            "type": layer_type or None,
            "profile": int(match.group(1)) if match else 0,
            "tactic": tactic,
            "gemm": gemm,
            "sparse_tactic": bool(gemm and tactic and _SPARSE_TACTIC.search(tactic)),
            "sparse_weights": None if has_sparse is None else bool(has_sparse),
            "opaque": layer_type == "Myelin" or name.startswith("{ForeignNode["),
        })
    return records


def kernel_evidence(records: list[dict], profile_names: list[str] | None = None, sparsity_log: dict | None = None) -> dict:
    """The Session's ``kernels()``: "used" only when the inspector names a sparse tactic
    for a GEMM/conv layer; "not-used" when it shows every layer's tactic and none is
    sparse; "unknown" when it cannot tell (no DETAILED verbosity, or matrix products
    hidden inside Myelin foreign nodes)."""
    names = profile_names or []
    gemms = [r for r in records if r["gemm"]]
    sparse = [r for r in gemms if r["sparse_tactic"]]
    opaque = [r for r in records if r["opaque"]]
    untold = [r for r in gemms if not r["tactic"]]
    parts = []
    listed = sorted({r["profile"] for r in gemms})
    # TensorRT 10 may list one set of layers for all profiles (no " [profile N]" names):
    # then no count belongs to the first profile alone.
    one_list = listed == [0] and len(names) > 1
    for index in listed:
        in_profile = [r for r in gemms if r["profile"] == index]
        hits = [r["name"] for r in in_profile if r["sparse_tactic"]]
        label = ("all profiles (the inspector lists them as one)" if one_list
                 else names[index] if index < len(names) else f"profile {index}")
        shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
        parts.append(f"{label}: {len(hits)} of {len(in_profile)}" + (f" ({shown})" if hits else ""))
    summary = f"{len(sparse)} of {len(gemms)} GEMM/conv layers ran sparse tactics"
    if parts:
        summary += ": " + "; ".join(parts)
    if opaque:
        summary += f"; {len(opaque)} Myelin foreign node(s) whose kernels the inspector does not show"
    if untold:
        summary += f"; {len(untold)} GEMM/conv layer(s) without a tactic name (engine not built with DETAILED verbosity)"
    if sparsity_log and (sparsity_log.get("eligible") or sparsity_log.get("picked")):
        summary += (f"; builder log: {len(sparsity_log.get('eligible', []))} layer(s) eligible for sparse math, "
                    f"sparse implementation picked for {len(sparsity_log.get('picked', []))}")
    if sparse:
        state = "used"
    elif gemms and not opaque and not untold:
        state = "not-used"
    else:
        state = "unknown"
    return {"sparse_kernels": state, "evidence": "TensorRT engine inspector: " + summary, "layers": records,
            "build_log": sparsity_log or {"eligible": [], "picked": []}}
