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
fuses best. For INT8, ``smoothed_copy`` first applies SmoothQuant: one scale per
activation tensor cannot serve the few outlier channels LLM activations have, so their
range is moved into the weights (per-channel scales absorb it) by factors folded into the
norm that writes the activation. The math is in pure functions (``symmetric_scales``,
``quantize_weight``, ``smoothing_scales``) tested on small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsedeploy.errors import BadInput

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


def channel_ranges(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> dict[str, torch.Tensor]:
    """Max |input| per input channel of each named linear over the calibration
    ``windows`` [n, seqlen], run one window at a time through ``model`` (float32 is fine:
    ranges are a property of the checkpoint, not of the precision that will run it)."""
    ranges: dict[str, torch.Tensor] = {}
    hooks = []

    def recorder(name: str):
        def hook(_module, args):
            seen = args[0].detach().abs().flatten(0, -2).amax(dim=0).float().cpu()
            ranges[name] = seen if name not in ranges else torch.maximum(ranges[name], seen)
        return hook

    for name, linear in linears:
        hooks.append(linear.register_forward_pre_hook(recorder(name)))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def activation_ranges(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> dict[str, float]:
    """Max |input| of each named linear over the calibration ``windows`` (per tensor)."""
    return {name: float(values.max()) for name, values in channel_ranges(model, windows, linears).items()}


# -- smoothing (SmoothQuant) --------------------------------------------------------


def smoothing_scales(activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s = a^alpha / w^(1 - alpha)``. Dividing
    the activation by ``s`` and multiplying the weights' input channel by ``s`` leaves the
    product unchanged and moves the activation's outlier channels (which one per-tensor
    scale cannot serve) into the weights (whose per-channel scales can). A channel where
    either maximum is zero keeps 1."""
    if not 0.0 <= alpha <= 1.0:
        raise BadInput(f"smoothquant_alpha must lie in [0, 1], not {alpha}; 0.5 is SmoothQuant's default")
    activation, weight = activation_absmax.float(), weight_absmax.float()
    scales = activation.pow(alpha) / weight.pow(1.0 - alpha)
    usable = (activation > 0) & (weight > 0) & torch.isfinite(scales)
    return torch.where(usable, scales.clamp(min=1e-5), torch.ones_like(scales))


@dataclass
class SmoothingGroup:
    """Linears that read one tensor, and the module that wrote it (a norm, when foldable)."""

    producer: str | None
    linears: list[str]


def smoothing_groups(model: nn.Module, window: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> list[SmoothingGroup]:
    """Group the linears by the tensor they read, found by running one ``window``: q, k
    and v read the attention norm's output, gate and up the MLP norm's. ``producer`` is the
    innermost module whose output that tensor is (None: an expression, e.g. the product
    the MLP's down projection reads). Found from the model, not from module names."""
    linear_names = {id(module): name for name, module in linears}
    writers: dict[int, str] = {}  # tensor id -> module that returned it (innermost first)
    readers: dict[int, list[str]] = {}
    alive = []  # keeps every seen tensor alive, so no id is reused within the pass
    hooks = []

    def wrote(name: str):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor):
                alive.append(output)
                writers.setdefault(id(output), name)
        return hook

    def read(name: str):
        def hook(_module, args):
            alive.append(args[0])
            readers.setdefault(id(args[0]), []).append(name)
        return hook

    for name, module in model.named_modules():
        if id(module) in linear_names:
            hooks.append(module.register_forward_pre_hook(read(name)))
        elif name:
            hooks.append(module.register_forward_hook(wrote(name)))
    try:
        with torch.no_grad():
            model(input_ids=window[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [SmoothingGroup(writers.get(tensor), names) for tensor, names in readers.items()]


def _fold_into_norm(norm: nn.Module, scales: torch.Tensor) -> bool:
    """Divide ``norm``'s output by ``scales`` through its own parameters, if they scale
    its output: as ``weight`` (Llama, Qwen, OPT's LayerNorm with its bias) or as
    ``1 + weight`` (Gemma). Each form is checked on a probe input and undone when it
    does not hold (activations, norms without an affine weight)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != scales.shape:
        return False
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    factors = scales.to(weight)
    probe = torch.randn(2, 3, scales.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        expected = norm(probe) / factors
        saved_weight, saved_bias = weight.detach().clone(), None if bias is None else bias.detach().clone()
        for offset in (0.0, 1.0):  # output = x * weight, or x * (1 + weight)
            weight.copy_((saved_weight + offset) / factors - offset)
            if bias is not None:
                bias.copy_(saved_bias / factors)
            if torch.allclose(norm(probe), expected, rtol=1e-4, atol=1e-5):
                return True
        weight.copy_(saved_weight)
        if bias is not None:
            bias.copy_(saved_bias)
    return False


def smoothed_copy(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]], alpha: float) -> tuple[nn.Module, dict]:
    """A copy of ``model`` computing the same function with its norm-fed linears'
    activation outliers folded into their weights (SmoothQuant, ``alpha``), and a record.
    Zeros stay zeros (columns are scaled), so 2:4 stays 2:4. Only the parameters it
    changes are copied; the rest are shared with ``model``, which is left as it is."""
    import copy

    modules = dict(model.named_modules())
    ranges = channel_ranges(model, windows, linears)
    groups = [g for g in smoothing_groups(model, windows[0], linears) if g.producer is not None]
    changed = {id(p) for g in groups for name in [g.producer, *g.linears] for p in modules[name].parameters(recurse=False)}
    memo = {id(p): (nn.Parameter(p.detach().clone(), requires_grad=False) if id(p) in changed else p) for p in model.parameters()}
    smoothed = copy.deepcopy(model, memo)
    copies = dict(smoothed.named_modules())
    folded, skipped = [], []
    for group in groups:
        activation = torch.stack([ranges[name] for name in group.linears]).amax(dim=0)
        weight = torch.stack([modules[name].weight.detach().abs().amax(dim=0).float().cpu() for name in group.linears]).amax(dim=0)
        scales = smoothing_scales(activation, weight, alpha)
        if not _fold_into_norm(copies[group.producer], scales):
            skipped.append(group.producer)  # an activation function, or a norm of another form
            continue
        for name in group.linears:
            target = copies[name].weight
            target.data.mul_(scales.to(target)[None, :])
        folded.append({"norm": group.producer, "linears": len(group.linears),
                       "largest_factor": round(float(scales.max()), 3), "smallest_factor": round(float(scales.min()), 5)})
    record = {"method": "SmoothQuant (per-channel factors folded into the preceding norm)", "alpha": alpha,
              "groups_smoothed": len(folded), "linears_smoothed": sum(g["linears"] for g in folded),
              "not_foldable": skipped}
    return smoothed, record


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
