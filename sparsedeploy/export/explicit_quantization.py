"""Explicit (Q/DQ) INT8 and FP8 quantization of a float16 decoder graph, for TensorRT's
strongly typed builds.

TensorRT 11 takes precision only from the graph (no INT8 / FP8 builder flags, no
calibrators): a linear layer runs in INT8 or FP8 where its activation and its weight
each pass through a QuantizeLinear / DequantizeLinear pair. This module writes those
pairs itself, from ranges measured in PyTorch, because ONNX Runtime's quantizer does not
handle float16 graphs (its float8 histogram fails on float16 activations, and at opset 17
it writes float16 scales the opset does not allow).

What it writes, per linear layer ``y = x @ W`` (W stored [in, out]) that is quantized:

    x  -> QuantizeLinear(s_x, 0) -> DequantizeLinear(s_x, 0) -> MatMul -> y
    W_quantized [in, out] -> DequantizeLinear(s_w [out], 0, axis=1) ----^

symmetric (zero point 0, so pruned zeros stay exactly zero and 2:4 stays 2:4), one
activation scale per tensor (max |x| over the calibration windows, "max" calibration),
one weight scale per output channel; scales are float16 like the graph (opset 19).
Layers that read the same activation (q, k and v) share one Q/DQ pair, the form TensorRT
fuses best. For INT8 the caller first applies SmoothQuant (``smoothing.smoothed_copy``):
one scale per activation tensor cannot serve the few outlier channels LLM activations
have. The math is in pure functions (``symmetric_scales``, ``quantize_weight``) tested on
small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsedeploy.errors import BadInput
from sparsedeploy.export.smoothing import channel_ranges

QDQ_OPSET = 19  # float16 scales in Q/DQ, and float8 types, need opset 19


@dataclass(frozen=True)
class QuantizedFormat:
    onnx_type: str  # TensorProto member name
    largest: float  # largest representable magnitude used: the scale maps max |x| there


FORMATS = {"int8": QuantizedFormat("INT8", 127.0), "fp8": QuantizedFormat("FLOAT8E4M3FN", 448.0)}
# float16's smallest normal number: a scale below it would lose precision or vanish.
_SMALLEST_SCALE = float(np.finfo(np.float16).tiny)


def _format(precision: str) -> QuantizedFormat:
    if precision not in FORMATS:
        raise BadInput(f"explicit quantization is int8 or fp8, not {precision}")
    return FORMATS[precision]


# -- the math -----------------------------------------------------------------------


def symmetric_scales(absmax: np.ndarray, precision: str) -> np.ndarray:
    """float16 scales that map ``absmax`` onto the format's largest value (an all-zero
    channel gets the smallest scale, not 0, which would divide by zero)."""
    largest = _format(precision).largest
    scales = np.maximum(np.asarray(absmax, np.float32) / largest, _SMALLEST_SCALE)
    return scales.astype(np.float16)


def quantize_weight(weight: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [in, out] -> (quantized [in, out], float16 scales [out]), symmetric per
    output channel: ``quantized * scales`` approximates ``weight``, and every zero of
    ``weight`` is a zero of ``quantized``. int8 values lie in [-127, 127]; fp8 values are
    float8 e4m3fn (ml_dtypes), rounded to nearest, within +-448."""
    values = np.asarray(weight, np.float32)
    scales = symmetric_scales(np.abs(values).max(axis=0), precision)
    scaled = values / scales.astype(np.float32)
    largest = _format(precision).largest
    if precision == "int8":
        return np.clip(np.rint(scaled), -largest, largest).astype(np.int8), scales
    import ml_dtypes

    # Clip first: float8 e4m3fn has no infinity, and ml_dtypes turns overflow into NaN.
    return np.clip(scaled, -largest, largest).astype(ml_dtypes.float8_e4m3fn), scales


# -- calibration --------------------------------------------------------------------


def activation_ranges(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> dict[str, float]:
    """Max |input| of each named linear over the calibration ``windows`` (per tensor)."""
    return {name: float(values.max()) for name, values in channel_ranges(model, windows, linears).items()}


# -- the graph ----------------------------------------------------------------------


def insert_qdq(proto, ranges: dict[str, float], precision: str, keep_float: set[str] = frozenset()) -> dict:
    """Quantize, in ``proto`` (loaded with its weights), every MatMul whose B is a float16
    initializer named after a torch linear weight (``<module>.weight.T``, as the exporter
    names them) with a range in ``ranges`` (module name -> max |input|), except the nodes
    named in ``keep_float``. Returns what it did."""
    from onnx import NodeProto, TensorProto, helper, numpy_helper

    fmt = _format(precision)
    element = getattr(TensorProto, fmt.onnx_type)
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    activation_ranges: dict[str, float] = {}
    chosen = []
    skipped = {"kept_float": 0, "no_range": 0}
    nodes = list(graph.node)
    for index, node in enumerate(nodes):
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT16 or len(weight.dims) != 2:
            continue  # activation x activation products, or not a float16 linear
        if node.name in keep_float:
            skipped["kept_float"] += 1
            continue
        module = weight.name.removesuffix(".T").removesuffix(".weight")
        if not weight.name.endswith(".weight.T") or module not in ranges:
            skipped["no_range"] += 1
            continue
        activation = node.input[0]
        activation_ranges[activation] = max(activation_ranges.get(activation, 0.0), ranges[module])
        chosen.append((index, node, weight))

    zero = np.zeros((), np.int8) if precision == "int8" else np.zeros((), np.float32)

    def zero_point(name: str, count: int | None = None):
        shape = () if count is None else (count,)
        return helper.make_tensor(name, element, shape, np.broadcast_to(zero, shape).ravel().tolist())

    new_nodes: dict[int, list] = {}  # node index -> nodes to insert before it
    dequantized = {}
    for activation, absmax in activation_ranges.items():
        scale_name, point_name = f"{activation}_scale", f"{activation}_zero_point"
        graph.initializer.append(numpy_helper.from_array(symmetric_scales(np.float32(absmax), precision), scale_name))
        graph.initializer.append(zero_point(point_name))
        quantized, restored = f"{activation}_quantized", f"{activation}_dequantized"
        dequantized[activation] = restored
        first = next(index for index, node, _ in chosen if node.input[0] == activation)
        new_nodes.setdefault(first, []).extend([
            helper.make_node("QuantizeLinear", [activation, scale_name, point_name], [quantized], name=f"{activation}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [quantized, scale_name, point_name], [restored], name=f"{activation}_DequantizeLinear"),
        ])

    for index, node, weight in chosen:
        values, scales = quantize_weight(numpy_helper.to_array(weight), precision)
        stored = numpy_helper.from_array(values, f"{weight.name}_quantized")
        graph.initializer.remove(weight)
        graph.initializer.extend([stored, numpy_helper.from_array(scales, f"{weight.name}_scale"),
                                  zero_point(f"{weight.name}_zero_point", scales.size)])
        restored = f"{weight.name}_dequantized"
        new_nodes.setdefault(index, []).append(helper.make_node(
            "DequantizeLinear", [stored.name, f"{weight.name}_scale", f"{weight.name}_zero_point"], [restored],
            name=f"{weight.name}_DequantizeLinear", axis=1))
        node.input[0], node.input[1] = dequantized[node.input[0]], restored

    # Rebuild the node list with each pair just before its first consumer: still sorted.
    ordered = []
    for index, node in enumerate(nodes):
        ordered.extend(new_nodes.get(index, []))
        kept = NodeProto()
        kept.CopyFrom(node)
        ordered.append(kept)
    del graph.node[:]
    graph.node.extend(ordered)
    return {"quantizer": "sparsedeploy Q/DQ (symmetric; per-tensor activations, per-channel weights)",
            "precision": precision, "element_type": fmt.onnx_type, "calibration": "max |activation|",
            "linears_quantized": len(chosen), "activation_pairs": len(activation_ranges),
            "linears_float": skipped["kept_float"] + skipped["no_range"], "linears_without_range": skipped["no_range"]}


def quantize_graph(src: Path, dst: Path, precision: str, ranges: dict[str, float], keep_float: set[str] = frozenset()) -> dict:
    """``src`` (a float16 export, weights beside it) with Q/DQ inserted, written to ``dst``
    with its weights in ``dst.name + '.data'`` beside it; onnx-checked. Returns
    ``insert_qdq``'s record."""
    import onnx

    proto = onnx.load(str(src), load_external_data=True)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_OPSET:
        raise BadInput(f"Q/DQ with float16 scales needs ONNX opset {QDQ_OPSET} or newer, the graph has {opset}; "
                       f"export with opset >= {QDQ_OPSET}")
    summary = insert_qdq(proto, ranges, precision, keep_float)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data", size_threshold=1024)
    onnx.checker.check_model(str(dst))
    return summary
