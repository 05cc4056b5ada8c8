"""Quantize an exported decoder (``model.onnx``) for the CPU targets with ONNX Runtime's
quantizers, keeping pruned zeros exactly zero.

Schemes (``quantize_onnx(..., scheme)``); every one quantizes only the MatMuls whose B
is a constant weight, i.e. the linear layers, never attention's activation x activation
products, norms, the residual stream or the embedding:

    int8-dynamic           quantize_dynamic: int8 weights (per tensor), activations
                           quantized at run time (DynamicQuantizeLinear, uint8)
                           -> MatMulInteger with an explicit B zero point.
    int8-static-qdq        quantize_static, QDQ format: int8 weights, uint8 activations
                           with ranges calibrated on ``calibration_feeds`` (MinMax) ->
                           QuantizeLinear/DequantizeLinear around a float MatMul, which
                           ORT fuses into integer kernels at load time.
    int8-static-qoperator  quantize_static, QOperator format, per tensor: QLinearMatMul
                           (explicit zero points for A, B and Y). The form DeepSparse 1.8
                           accepts; a MatMulInteger without B zero point aborts it, and
                           quantize_dynamic's u8s8 graphs ran silently wrong there.
    int4-weight-only       ORT's blockwise 4-bit weight quantizer: MatMulNBits (bits 4,
                           ``block_size`` weights of one column per scale), float activations.

Pruned zeros survive. Every scheme quantizes weights symmetrically (forced, not left to
ORT's defaults: quantize_static/dynamic make signed weights symmetric only because
WeightSymmetric is unset, and the 4-bit quantizer is asymmetric by default): the zero
point is the middle of the integer range (0 for int8, 8 for 4 bits), and 0.0 quantizes
to it exactly whatever the scale. ``QuantizeResult.sparsity`` is measured in the written
graph (``onnx_decoder.sparsity_report`` reads integer weights against their zero points);
it can exceed the float sparsity (weights under half a quantization step round to zero,
much more so at 4 bits), and N:M compliance can only go up.

The LM head stays float (``LM_HEAD_FLOAT``, measured below). A tied head is a Transpose
of the embedding, which none of these quantizers treat as a weight anyway; an untied
head is excluded by node name.

Preprocessing: ORT recommends ``quant_pre_process`` (symbolic shape inference + ORT's
basic graph optimisation). It is not run here: its constant folding turns the tied
head's Transpose back into a second copy of the embedding (+vocab x hidden floats, 113 MB
on SmolLM2-135M), and the quantizers' own ONNX shape inference suffices for MatMul-only
quantization of our opset 14-20 graphs. That shape inference writes a ``*-inferred.onnx``
beside its input, so the source graph is first copied (with its external data) into a
scratch directory inside ``dst_dir``, which is removed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparsedeploy.errors import BadInput
from sparsedeploy.export.onnx_decoder import (
    DATA_FILE,
    MODEL_FILE,
    _consumers,
    _feeds_output,
    _first_line,
    _lower_ir_version,
    _save,
    _weight_uses,
    sparsity_report,
)

SCHEMES = ("int8-dynamic", "int8-static-qdq", "int8-static-qoperator", "int4-weight-only")
STATIC_SCHEMES = ("int8-static-qdq", "int8-static-qoperator")
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits needs a power-of-two block of at least 16 weights.
MIN_BLOCK_SIZE = 16
# Op types quantized: the linear layers (with MatMulConstBOnly, only MatMuls whose B is a
# constant). Gemm (biased linears on 2-D activations, e.g. OPT's) stays float: neither
# quantize_dynamic nor the 4-bit quantizer handles it, and every scheme should quantize
# the same layers.
OP_TYPES = ("MatMul",)
# LM head in float. Measured (see the notes in the module's report): TODO fill in.
LM_HEAD_FLOAT = True


@dataclass
class QuantizeResult:
    path: Path  # dst_dir / model.onnx
    scheme: str
    seconds: float
    bytes: int  # total size of the files written
    files: list[str]  # file names inside dst_dir
    settings: dict  # the ONNX Runtime quantizer and the settings it was called with
    sparsity: dict = field(repr=False)  # sparsity_report() of the quantized graph
    source: str = ""  # the float model.onnx quantized

    @property
    def directory(self) -> Path:
        return self.path.parent

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    def describe(self) -> dict:
        """A short JSON record for a build report: everything but the per-weight list."""
        summary = {key: value for key, value in self.sparsity.items() if key != "linear_weights"}
        return {
            "scheme": self.scheme,
            "settings": self.settings,
            "seconds": round(self.seconds, 1),
            "bytes": self.bytes,
            "files": self.files,
            "sparsity": summary,
        }


def quantize_onnx(
    src: Path | str,
    dst_dir: Path | str,
    scheme: str,
    calibration_feeds=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizeResult:
    """Quantize ``src`` (an exported ``model.onnx``, external data beside it) into the
    existing empty directory ``dst_dir`` (``model.onnx`` + ``model.onnx.data``, relative).

    ``calibration_feeds``: for the static schemes, an iterable of input dicts (name ->
    numpy array) covering the graph's inputs, e.g. :func:`calibration_feeds_from_windows`
    on calibration text (never the evaluation text). ``block_size``: int4 only.
    """
    import onnx

    src, dst_dir = Path(src).expanduser(), Path(dst_dir).expanduser()
    _check_arguments(src, dst_dir, scheme, calibration_feeds, block_size)
    try:
        proto = onnx.load(str(src), load_external_data=True)
    except Exception as error:
        raise BadInput(f"could not read ONNX model '{src}' ({_first_line(error)}); keep model.onnx and its .data file together") from None
    feeds = None
    if scheme in STATIC_SCHEMES:
        feeds = _check_feeds(list(calibration_feeds), proto.graph)

    started = time.perf_counter()
    exclude = lm_head_nodes(proto) if LM_HEAD_FLOAT else []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=dst_dir))
    try:
        if scheme == "int4-weight-only":
            settings = _quantize_nbits(proto, block_size, exclude)
            quantized = proto
        else:
            _save(proto, work / MODEL_FILE, external_data=True)
            del proto
            out = work / "out" / MODEL_FILE
            out.parent.mkdir()
            with _quiet_ort_hints():
                if scheme == "int8-dynamic":
                    settings = _quantize_dynamic(work / MODEL_FILE, out, exclude)
                else:
                    settings = _quantize_static(work / MODEL_FILE, out, scheme, feeds, exclude)
            quantized = onnx.load(str(out), load_external_data=True)
        _lower_ir_version(quantized, opset)
        sparsity = sparsity_report(quantized)
        final = work / "final"
        final.mkdir()
        _save(quantized, final / MODEL_FILE, external_data=True)
        del quantized
        files = sorted(p.name for p in final.iterdir())
        for name in files:
            (final / name).rename(dst_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum((dst_dir / name).stat().st_size for name in files)
    import onnxruntime

    settings = {"onnxruntime": onnxruntime.__version__, **settings, "lm_head": "float" if LM_HEAD_FLOAT else "quantized"}
    return QuantizeResult(
        path=dst_dir / MODEL_FILE,
        scheme=scheme,
        seconds=time.perf_counter() - started,
        bytes=size,
        files=files,
        settings=settings,
        sparsity=sparsity,
        source=str(src),
    )


def calibration_feeds_from_windows(windows, graph_path: Path | str) -> list[dict]:
    """Prefill feeds for static calibration, one per window of ``windows`` [n, seqlen]
    (token ids, torch or numpy): batch 1, past length 0, attention mask of ones, position
    ids 0..seqlen-1, as the graph at ``graph_path`` (an export with dynamic shapes) takes
    them. One window per feed keeps each calibration run small."""
    import onnx

    path = Path(graph_path).expanduser()
    if not path.is_file():
        raise BadInput(f"ONNX model '{path}' does not exist; pass the model.onnx of an export directory")
    windows = np.asarray(windows.cpu().numpy() if hasattr(windows, "cpu") else windows)
    if windows.ndim != 2 or 0 in windows.shape or not np.issubdtype(windows.dtype, np.integer):
        raise BadInput(f"calibration windows must be token ids [n, seqlen] (got {windows.dtype} {list(windows.shape)}); use sparsedeploy.data.windows.calibration_windows")
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {value.name: _dims(value) for value in graph.input}
    if "input_ids" not in shapes or not any(name.startswith("past_key_values.") for name in shapes):
        raise BadInput(f"'{path}' is not a decoder exported with a KV cache (no input_ids / past_key_values inputs); export it with export_decoder")
    seqlen = windows.shape[1]
    vocab = next((_dims(v)[-1] for v in graph.output if v.name == "logits"), None)
    if isinstance(vocab, int) and (windows.min() < 0 or windows.max() >= vocab):
        raise BadInput(f"calibration windows hold token ids outside [0, {vocab}); tokenize the text with this model's tokenizer")
    past = {}
    for name, dims in shapes.items():
        if name.startswith("past_key_values."):
            wanted = [1, None, 0, None]  # [batch, kv_heads, past, head_dim]: one window, empty cache
        elif name in ("input_ids", "position_ids", "attention_mask"):
            wanted = [1, seqlen]
        else:
            continue
        if len(dims) != len(wanted) or any(isinstance(d, int) and w is not None and d != w for d, w in zip(dims, wanted)):
            raise BadInput(
                f"'{path}' input {name} has static shape {dims}, which cannot take a prefill of "
                f"1 x {seqlen} tokens with an empty cache; export with dynamic shapes (no static_shapes)"
            )
        if name.startswith("past_key_values."):
            if not (isinstance(dims[1], int) and isinstance(dims[3], int)):
                raise BadInput(f"'{path}' input {name} has no fixed kv_heads / head_dim ({dims}); export it with export_decoder")
            past[name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
    positions = np.arange(seqlen, dtype=np.int64)[None]
    return [
        {
            "input_ids": row[None].astype(np.int64),
            "attention_mask": np.ones((1, seqlen), np.int64),
            "position_ids": positions,
            **past,
        }
        for row in windows
    ]


def lm_head_nodes(proto) -> list[str]:
    """Names of the nodes that apply the LM head (the linear whose output is the logits)
    with a constant weight: what the quantizers are told to leave in float. A tied head
    (a Transpose of the embedding) has no constant B and is left alone by them anyway."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    consumers = _consumers(graph)
    outputs = {output.name for output in graph.output}
    names = []
    for found in _weight_uses(graph, inits).values():
        for use in found:
            if use.kind == "linear" and _feeds_output(use.node, consumers, outputs):
                names.append(use.node.name)
    return names


# -- the four quantizers ------------------------------------------------------------


def _quantize_dynamic(src: Path, out: Path, exclude: list[str]) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = {"WeightSymmetric": True, "MatMulConstBOnly": True}
    settings = {
        "op_types_to_quantize": list(OP_TYPES),
        "per_channel": False,
        "reduce_range": False,
        "weight_type": QuantType.QInt8,
        "nodes_to_exclude": list(exclude),
        "extra_options": options,
    }
    quantize_dynamic(src, out, use_external_data_format=True, **settings)
    return {"quantizer": "quantize_dynamic", **_plain(settings)}


def _quantize_static(src: Path, out: Path, scheme: str, feeds: list[dict], exclude: list[str]) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {"WeightSymmetric": True, "ActivationSymmetric": False, "MatMulConstBOnly": True}
    settings = {
        "quant_format": QuantFormat.QDQ if scheme == "int8-static-qdq" else QuantFormat.QOperator,
        "op_types_to_quantize": list(OP_TYPES),
        "per_channel": False,
        "reduce_range": False,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
        "nodes_to_exclude": list(exclude),
        "extra_options": options,
    }
    quantize_static(src, out, _FeedReader(feeds), use_external_data_format=True, **settings)
    return {"quantizer": "quantize_static", **_plain(settings), "calibration_samples": len(feeds)}


class _FeedReader:
    """ORT's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)
        self._count = len(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def __len__(self) -> int:
        return self._count


def _quantize_nbits(proto, block_size: int, exclude: list[str], bits: int = 4) -> dict:
    """Replace each MatMul whose B is a float32 initializer [K, N] by ORT's MatMulNBits,
    in place, exactly as ``onnxruntime.quantization.matmul_nbits_quantizer`` does with
    ``MatMulNBitsQuantizer(model, bits=4, block_size, is_symmetric=True)`` (QOperator,
    DEFAULT algorithm, no accuracy_level): the same C++ kernel packs the weights, the
    same names and attributes are written (tests/test_onnx_quantize.py compares the two
    when onnx_ir is installed). Called directly because that module imports onnx_ir (not
    a dependency here) and calls ``logging.basicConfig(level=INFO)`` at import.

    Symmetric: scale = absmax / -8 per block, zero point 8 implicit (no zero_points
    input), so 0.0 packs to 8 and dequantizes to exactly 0.0.
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    if bits != 4:
        raise ValueError("only 4-bit MatMulNBits is built")
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    excluded = set(exclude)
    replaced = []
    for position, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.name in excluded or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            continue
        array = numpy_helper.to_array(weight)
        rows, cols = array.shape  # K, N
        blocks = (rows + block_size - 1) // block_size
        padded = np.zeros((blocks * block_size, cols), np.float32)
        padded[:rows] = array
        packed = np.zeros((cols, blocks, block_size * bits // 8), np.uint8)
        scales = np.zeros((cols, blocks), np.float32)
        zero_points = np.zeros((cols, (blocks + 1) // 2), np.uint8)
        quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, cols, rows, True)
        packed_init = numpy_helper.from_array(packed, f"{weight.name}_Q{bits}")
        scales_init = numpy_helper.from_array(scales, f"{weight.name}_scales")
        graph.initializer.extend([packed_init, scales_init])
        replacement = helper.make_node(
            "MatMulNBits",
            [node.input[0], packed_init.name, scales_init.name],
            list(node.output),
            name=f"{node.name}_Q{bits}" if node.name else "",
            domain="com.microsoft",
            K=rows,
            N=cols,
            bits=bits,
            block_size=block_size,
        )
        replaced.append((position, replacement))
    for position, replacement in replaced:
        graph.node[position].CopyFrom(replacement)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if replaced and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {
        "quantizer": "MatMulNBits (onnxruntime.quantization.matmul_nbits_quantizer's DEFAULT algorithm)",
        "bits": bits,
        "block_size": block_size,
        "is_symmetric": True,
        "accuracy_level": None,
        "quant_format": "QOperator",
        "op_types_to_quantize": list(OP_TYPES),
        "nodes_to_exclude": list(exclude),
        "quantized_nodes": len(replaced),
    }


# -- checks and helpers ---------------------------------------------------------------


def _check_arguments(src: Path, dst_dir: Path, scheme: str, calibration_feeds, block_size: int) -> None:
    if scheme not in SCHEMES:
        raise BadInput(f"quantization scheme '{scheme}' is unknown; use one of {', '.join(SCHEMES)}")
    if not src.is_file():
        raise BadInput(f"ONNX model '{src}' does not exist; pass the model.onnx of an export directory")
    if not dst_dir.is_dir():
        raise BadInput(f"output directory '{dst_dir}' does not exist; create an empty directory first")
    if any(dst_dir.iterdir()):
        raise BadInput(f"output directory '{dst_dir}' is not empty; pass an empty directory")
    if scheme in STATIC_SCHEMES and calibration_feeds is None:
        raise BadInput(f"scheme '{scheme}' needs calibration_feeds; build them with calibration_feeds_from_windows on calibration text")
    if scheme not in STATIC_SCHEMES and calibration_feeds is not None:
        raise BadInput(f"scheme '{scheme}' takes no calibration_feeds; pass none, or use {' or '.join(STATIC_SCHEMES)}")
    if scheme == "int4-weight-only":
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
            raise BadInput(f"int4 block_size {block_size!r} is not a power of two >= {MIN_BLOCK_SIZE}; use e.g. 32 or 128")


def _check_feeds(feeds: list[dict], graph) -> list[dict]:
    if not feeds:
        raise BadInput("calibration_feeds is empty; give at least one feed (calibration_feeds_from_windows)")
    wanted = {value.name for value in graph.input} - {init.name for init in graph.initializer}
    for index, feed in enumerate(feeds):
        names = set(feed) if isinstance(feed, dict) else set()
        if names != wanted:
            missing, unknown = sorted(wanted - names), sorted(names - wanted)
            raise BadInput(
                f"calibration feed {index} does not match the graph's inputs (missing {missing[:3]}, unknown {unknown[:3]}); "
                "build feeds with calibration_feeds_from_windows"
            )
    return feeds


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _plain(settings: dict) -> dict:
    """The settings as JSON: ORT's enums by name."""

    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return getattr(value, "name", value) if hasattr(value, "name") and not isinstance(value, str) else value

    return plain(settings)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort_hints():
    """quantize_static/dynamic log a 'consider pre-processing' warning on the root logger
    twice per call; we skip that step on purpose (module docstring), so drop it."""
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
