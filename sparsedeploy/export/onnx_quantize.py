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
                           Plain rounding; the onnxruntime target runs GPTQ first
                           (``sparsedeploy.export.gptq``), whose weights already lie on
                           this grid, so the rounding reproduces them exactly.

Pruned zeros survive. Every scheme quantizes weights symmetrically (forced, not left to
ORT's defaults: quantize_static/dynamic make signed weights symmetric only because
WeightSymmetric is unset, and the 4-bit quantizer is asymmetric by default): the zero
point is the middle of the integer range (0 for int8, 8 for 4 bits), and 0.0 quantizes
to it exactly whatever the scale. ``QuantizeResult.sparsity`` is measured in the written
graph (``onnx_decoder.sparsity_report`` reads integer weights against their zero points);
it can exceed the float sparsity (weights under half a quantization step round to zero,
much more so at 4 bits), and N:M compliance can only go up.

Weights are quantized per tensor in the int8 schemes. Per channel (``per_channel=True``,
axis 1 = output columns of our [in, out] weights) would be finer, but ORT 1.32's fused
CPU kernels compute such graphs wrongly: correct with graph optimisation disabled (tiny
model: relative logit error 0.024 vs 0.025 per tensor), wrong with it (0.075; SmolLM2
perplexity 4e6 with quantize_dynamic, 4199 with QDQ). Revisit with a newer ORT.

Some linear layers stay float, chosen by measurement (``FLOAT_LAYERS``): the LM head
always, and for the int8 schemes the MLP down projections, whose input activations have
outliers a per-tensor 8-bit scale cannot hold. A tied head is a Transpose of the
embedding, which none of these quantizers treat as a weight anyway; the others are
excluded by node name.

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
    MODEL_FILE,
    _consumers,
    _feeds_output,
    _first_line,
    _lower_ir_version,
    _save,
    _weight_types,
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
# Linear layers each scheme leaves in float unless ``float_layers`` says otherwise:
# "lm_head", and "mlp_down", the MLP down projections (see mlp_down_nodes), for the
# int8 schemes, which quantize activations too. Measured on SmolLM2-135M (tied head),
# WikiText-2 2 x 512 tokens, float export ppl 26.82 (539 MB); static schemes calibrated
# on Canterbury 16 x 256:
#   int8-dynamic, all linears      ppl 47.6  top-1 vs float 0.60  222 MB
#   int8-dynamic, mlp_down float   ppl 28.2  top-1 0.84           301 MB
#   int8-static (QDQ = QOperator)  ppl 99.7 -> 28.9 with mlp_down float (top-1 0.40 -> 0.80)
#   (reduce_range or uint8 weights do not help: 49.4 / 45.8; it is not AVX2 saturation
#   but the down projections' input, SiLU(gate) * up, whose outlier channels a
#   per-tensor 8-bit activation scale cannot hold.) The int4 scheme keeps activations
#   float and quantizes the down projections fine.
#   LM head quantized instead of float (through an untied copy, since the tied head
#   shares the float embedding the Gather needs): int8-dynamic ppl 28.9 vs 28.2 and
#   +28 MB; int4 ppl 35.0 vs 32.1 and +18 MB. On the tiny random test model (untied head)
#   quantizing the head raises the relative RMS logit error too: int8-dynamic 0.017 ->
#   0.021, int4 0.089 -> 0.124. So the head stays float: better, and smaller when tied.
FLOAT_LAYER_KINDS = ("lm_head", "mlp_down")
FLOAT_LAYERS = {
    "int8-dynamic": ("lm_head", "mlp_down"),
    "int8-static-qdq": ("lm_head", "mlp_down"),
    "int8-static-qoperator": ("lm_head", "mlp_down"),
    "int4-weight-only": ("lm_head",),
}


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
    float_layers=None,
) -> QuantizeResult:
    """Quantize ``src`` (an exported ``model.onnx``, external data beside it) into the
    existing empty directory ``dst_dir`` (``model.onnx`` + ``model.onnx.data``, relative).

    ``calibration_feeds``: for the static schemes, an iterable of input dicts (name ->
    numpy array) covering the graph's inputs, e.g. :func:`calibration_feeds_from_windows`
    on calibration text (never the evaluation text). ``block_size``: int4 only.
    ``float_layers``: which linear layers stay float, a subset of FLOAT_LAYER_KINDS;
    None: the scheme's measured default (FLOAT_LAYERS).
    """
    import onnx

    started = time.perf_counter()
    src, dst_dir = Path(src).expanduser(), Path(dst_dir).expanduser()
    _check_arguments(src, dst_dir, scheme, calibration_feeds, block_size)
    kinds = _check_float_layers(FLOAT_LAYERS[scheme] if float_layers is None else float_layers)
    try:
        proto = onnx.load(str(src), load_external_data=True)
    except Exception as error:
        raise BadInput(
            f"could not read ONNX model '{src}' ({_first_line(error)}); keep model.onnx and its .data file together"
        ) from None
    feeds = None
    if scheme in STATIC_SCHEMES:
        feeds = _check_feeds(list(calibration_feeds), proto.graph)

    finders = {"lm_head": lm_head_nodes, "mlp_down": mlp_down_nodes}
    exclude = [name for kind in kinds for name in finders[kind](proto)]
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

    settings = {"onnxruntime": onnxruntime.__version__, "float_layers": list(kinds), **settings}
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
        raise BadInput(
            f"calibration windows must be token ids [n, seqlen] (got {windows.dtype} {list(windows.shape)}); "
            "use sparsedeploy.data.windows.calibration_windows"
        )
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {value.name: _dims(value) for value in graph.input}
    if "input_ids" not in shapes or not any(name.startswith("past_key_values.") for name in shapes):
        raise BadInput(
            f"'{path}' is not a decoder exported with a KV cache (no input_ids / past_key_values inputs); "
            "export it with export_decoder"
        )
    seqlen = windows.shape[1]
    vocab = next((_dims(v)[-1] for v in graph.output if v.name == "logits"), None)
    if isinstance(vocab, int) and (windows.min() < 0 or windows.max() >= vocab):
        raise BadInput(
            f"calibration windows hold token ids outside [0, {vocab}); tokenize the text with this model's tokenizer"
        )
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
                raise BadInput(
                    f"'{path}' input {name} has no fixed kv_heads / head_dim ({dims}); export it with export_decoder"
                )
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
    """Names of the nodes that apply the LM head (the linear whose output is the logits),
    which the quantizers are told to leave float. A tied head's MatMul is listed too,
    though its B (a Transpose of the embedding) is no constant weight to them anyway."""
    graph = proto.graph
    consumers = _consumers(graph)
    outputs = {output.name for output in graph.output}
    names = []
    for found in _weight_uses(graph, _weight_initializers(graph)).values():
        for use in found:
            if use.kind == "linear" and _feeds_output(use.node, consumers, outputs):
                names.append(use.node.name)
    return names


def mlp_down_nodes(proto) -> list[str]:
    """Names of the MLP down projections: MatMuls whose constant weight B [K, N] maps a
    wider activation back to the hidden size (N = the token embedding's width < K), e.g.
    Llama's down_proj; found from the graph's shapes, not from names. (Where attention is
    wider than the hidden size, as in some Gemma 3 sizes, the attention output projection
    matches too and stays float with them.)"""
    graph = proto.graph
    inits = _weight_initializers(graph)
    embeddings = [
        inits[name] for name, found in _weight_uses(graph, inits).items() if any(use.kind == "embedding" for use in found)
    ]
    if not embeddings:
        return []
    hidden = max(embeddings, key=lambda init: init.dims[0]).dims[1]
    names = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type in OP_TYPES and len(node.input) > 1 else None
        if weight is not None and len(weight.dims) == 2 and weight.dims[1] == hidden < weight.dims[0]:
            names.append(node.name)
    return names


def _weight_initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer if init.data_type in _weight_types()}


# -- the four quantizers ------------------------------------------------------------


def _quantize_dynamic(src: Path, out: Path, exclude: list[str]) -> dict:
    """quantize_dynamic: int8 weights, symmetric per tensor (WeightSymmetric set rather
    than implied by QInt8), each a MatMulInteger with its zero point as an explicit input
    (DeepSparse aborts without one); activations quantized per call (uint8)."""
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
    """quantize_static, QDQ or QOperator: int8 symmetric weights and uint8 asymmetric
    activations (ORT's advice for x86 CPUs), per tensor, ranges from MinMax calibration
    on the feeds. reduce_range stays off: it did not help quantize_dynamic on an AVX2
    machine without VNNI (see FLOAT_LAYERS), so u8s8 saturation is not what limits quality."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
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
    # The QDQ quantizer ignores MatMulConstBOnly: name attention's activation x activation
    # MatMuls (and a tied head's, whose B is a Transpose output) to keep them float.
    products = _activation_matmuls(src)
    call = {**settings, "nodes_to_exclude": settings["nodes_to_exclude"] + products}
    try:
        quantize_static(src, out, _FeedReader(feeds), use_external_data_format=True, **call)
    except InvalidArgument as error:  # a feed of the wrong dtype or rank
        raise BadInput(
            f"calibration feeds do not run in ONNX Runtime ({_first_line(error)}); "
            "build them with calibration_feeds_from_windows"
        ) from None
    return {
        "quantizer": "quantize_static",
        **_plain(settings),
        "activation_matmuls_excluded": len(products),
        "calibration_samples": len(feeds),
    }


def _activation_matmuls(path: Path) -> list[str]:
    """Names of the MatMuls whose B is not a constant weight."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type in OP_TYPES and node.input[1] not in constants]


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

    if bits != 4:
        raise ValueError("only 4-bit MatMulNBits is built")
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    excluded = set(exclude)
    replaced = []
    on_grid = 0  # weights the packing reproduced exactly (all of them after GPTQ)
    for position, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.name in excluded or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            continue
        array = numpy_helper.to_array(weight)
        rows, cols = array.shape  # K, N
        packed, scales = pack_4bits(array, block_size)
        on_grid += bool(np.array_equal(dequantize_4bits(packed, scales, rows), array))
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
        "weights_on_given_grid": on_grid,
    }


def pack_4bits(matrix: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 weight [K, N] packed by ONNX Runtime's own symmetric 4-bit packer, as
    MatMulNBits reads it: levels [N, blocks, block_size / 2] and scales [N, blocks]
    (K padded with zeros to whole blocks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = matrix.shape
    blocks = (rows + block_size - 1) // block_size
    padded = np.zeros((blocks * block_size, cols), np.float32)
    padded[:rows] = matrix
    packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, (blocks + 1) // 2), np.uint8)  # unused when symmetric
    quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, cols, rows, True)
    return packed, scales


def dequantize_4bits(packed: np.ndarray, scales: np.ndarray, rows: int) -> np.ndarray:
    """The float [K, N] weight a symmetric MatMulNBits computes with: ``packed``
    [N, blocks, block_size / 2] (two levels per byte, the lower column in the low
    nibble), ``scales`` [N, blocks], zero point 8; ``rows`` = K cuts the last block's
    padding."""
    cols, blocks, half = packed.shape
    levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, blocks, 2 * half).astype(np.float32)
    weights = (levels - 8.0) * scales.reshape(cols, blocks, 1)
    return np.ascontiguousarray(weights.reshape(cols, blocks * 2 * half)[:, :rows].T)


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
        raise BadInput(
            f"scheme '{scheme}' needs calibration_feeds; build them with calibration_feeds_from_windows on calibration text"
        )
    if scheme not in STATIC_SCHEMES and calibration_feeds is not None:
        raise BadInput(
            f"scheme '{scheme}' takes no calibration_feeds; pass none, or use {' or '.join(STATIC_SCHEMES)}"
        )
    if scheme == "int4-weight-only":
        whole = isinstance(block_size, int) and not isinstance(block_size, bool)
        if not whole or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
            raise BadInput(f"int4 block_size {block_size!r} is not a power of two >= {MIN_BLOCK_SIZE}; use e.g. 32 or 128")


def _check_float_layers(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [kind for kind in kinds if kind not in FLOAT_LAYER_KINDS]
    if unknown:
        raise BadInput(f"float_layers {unknown} unknown; choose from {', '.join(FLOAT_LAYER_KINDS)} (or none)")
    return tuple(dict.fromkeys(kinds))


def _check_feeds(feeds: list[dict], graph) -> list[dict]:
    if not feeds:
        raise BadInput("calibration_feeds is empty; give at least one feed (calibration_feeds_from_windows)")
    wanted = {value.name for value in graph.input} - {init.name for init in graph.initializer}
    for index, feed in enumerate(feeds):
        names = set(feed) if isinstance(feed, dict) else set()
        if names != wanted:
            missing, unknown = sorted(wanted - names), sorted(names - wanted)
            raise BadInput(
                f"calibration feed {index} does not match the graph's inputs "
                f"(missing {missing[:3]}, unknown {unknown[:3]}); "
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
