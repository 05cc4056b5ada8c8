"""Explicit Q/DQ quantization for TensorRT's strongly typed INT8 / FP8 builds: the scale
and weight math on small arrays, the graph rewrite on a hand-built float16 graph run in
ONNX Runtime, and the calibration hooks on a tiny model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import make_tiny_model
from sparsedeploy.errors import BadInput
from sparsedeploy.export.explicit_quantization import (
    QDQ_OPSET,
    activation_ranges,
    insert_qdq,
    quantize_graph,
    quantize_weight,
    symmetric_scales,
)
from sparsedeploy.kernels.semi_structured import named_linears

FLOAT16_TINY = float(np.finfo(np.float16).tiny)


def two_of_four_weight(rows: int = 16, cols: int = 6, seed: int = 0) -> np.ndarray:
    """[in, out] with two zeros in every four consecutive inputs of each output column."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    for start in range(0, rows, 4):
        block = np.abs(weight[start:start + 4])
        smallest = np.argsort(block, axis=0)[:2]
        np.put_along_axis(weight[start:start + 4], smallest, 0.0, axis=0)
    return weight


# -- the math -----------------------------------------------------------------------


def test_scales_map_the_range_onto_the_largest_value_and_never_vanish():
    assert symmetric_scales(np.array([254.0, 1.0]), "int8").tolist() == [2.0, np.float16(1 / 127)]
    assert symmetric_scales(np.array([448.0]), "fp8").tolist() == [1.0]
    zero = symmetric_scales(np.array([0.0, 1e-9]), "int8")
    assert zero.dtype == np.float16 and (zero == np.float16(FLOAT16_TINY)).all()  # no division by zero
    with pytest.raises(BadInput, match="int8 or fp8"):
        symmetric_scales(np.array([1.0]), "int4")


def test_int8_weights_are_per_output_channel_symmetric_and_keep_every_zero():
    weight = two_of_four_weight()
    weight[:, 2] *= 100.0  # one loud channel must not coarsen the others
    quantized, scales = quantize_weight(weight, "int8")
    assert quantized.dtype == np.int8 and quantized.shape == weight.shape and scales.shape == (6,)
    assert ((quantized == 0) == (weight == 0)).all()  # 2:4 stays 2:4
    assert np.abs(quantized).max(axis=0).tolist() == [127] * 6  # each channel uses the full range
    restored = quantized.astype(np.float32) * scales.astype(np.float32)
    # Rounding error at most half a step (plus the float16 scale's own rounding).
    assert (np.abs(restored - weight) <= 0.5 * scales.astype(np.float32) * 1.01 + 1e-6).all()


def test_fp8_weights_clip_instead_of_becoming_nan_and_keep_every_zero():
    import ml_dtypes

    weight = two_of_four_weight(seed=1)
    # float16 rounds 448 / x up for some x: the largest value lands a hair past 448,
    # which ml_dtypes' float8 e4m3fn turns into NaN unless clipped.
    weight[0, :] = [3.0, 7.0, 11.0, 13.0, 17.0, 19.0]
    quantized, scales = quantize_weight(weight, "fp8")
    assert quantized.dtype == ml_dtypes.float8_e4m3fn
    values = quantized.astype(np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() <= 448.0
    assert ((values == 0) == (weight == 0)).all()
    restored = values * scales.astype(np.float32)
    nonzero = weight != 0
    # e4m3: 3 mantissa bits, relative error at most 2^-4 for normal values
    relative = np.abs(restored - weight)[nonzero] / np.abs(weight)[nonzero]
    assert np.median(relative) < 2 ** -4 and relative.max() < 0.15


# -- the graph ----------------------------------------------------------------------


def two_linear_graph(opset: int = QDQ_OPSET, width: int = 6) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [2, 16] -> (x @ a.weight.T, x @ b.weight.T, x @ c_head) in float16: two linears
    that share their input (as q and k do), and a MatMul whose weight no linear owns."""
    weights = {"a.weight.T": two_of_four_weight(cols=width, seed=2), "b.weight.T": two_of_four_weight(cols=width, seed=3),
               "c_head": two_of_four_weight(cols=width, seed=4)}
    nodes = [helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"matmul_{i}") for i, name in enumerate(weights)]
    graph = helper.make_graph(
        nodes, "linears",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 16])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, [2, width]) for i in range(3)],
        [numpy_helper.from_array(w.astype(np.float16), name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), weights


def run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [y.astype(np.float32) for y in session.run(None, {"x": x.astype(np.float16)})]


@pytest.mark.parametrize("precision, element, tolerance", [("int8", TensorProto.INT8, 0.03), ("fp8", TensorProto.FLOAT8E4M3FN, 0.1)])
def test_insert_qdq_quantizes_named_linears_with_one_shared_activation_pair(precision, element, tolerance):
    proto, weights = two_linear_graph()
    x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    ranges = {"a": float(np.abs(x).max()), "b": float(np.abs(x).max()) / 2}
    summary = insert_qdq(proto, ranges, precision)
    onnx.checker.check_model(proto)

    assert summary["linears_quantized"] == 2 and summary["activation_pairs"] == 1
    assert summary["linears_float"] == 1 and summary["linears_without_range"] == 1  # c_head: no linear owns it
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # x once, then each weight
    inits = {init.name: init for init in proto.graph.initializer}
    assert inits["a.weight.T_quantized"].data_type == element and "a.weight.T" not in inits
    assert inits["c_head"].data_type == TensorProto.FLOAT16
    # The shared activation scale is the larger of the two ranges.
    scale = numpy_helper.to_array(inits["x_scale"])
    assert scale.dtype == np.float16 and scale == symmetric_scales(np.float32(ranges["a"]), precision)
    weight_dq = next(node for node in proto.graph.node if node.name == "a.weight.T_DequantizeLinear")
    assert helper.get_attribute_value(weight_dq.attribute[0]) == 1  # per output channel of [in, out]

    outputs = run(proto, x)
    for i, name in enumerate(weights):
        expected = x @ weights[name]
        assert np.linalg.norm(outputs[i] - expected) / np.linalg.norm(expected) < tolerance


def test_insert_qdq_leaves_the_nodes_asked_to_stay_float():
    proto, _ = two_linear_graph()
    summary = insert_qdq(proto, {"a": 1.0, "b": 1.0}, "int8", keep_float={"matmul_1"})
    assert summary["linears_quantized"] == 1 and summary["linears_float"] == 2
    inits = {init.name for init in proto.graph.initializer}
    assert "a.weight.T_quantized" in inits and "b.weight.T" in inits


def test_quantize_graph_writes_beside_itself_and_refuses_an_old_opset(tmp_path):
    proto, _ = two_linear_graph(width=128)  # 2 KiB weights: stored outside the graph
    onnx.save_model(proto, str(tmp_path / "in.onnx"))
    summary = quantize_graph(tmp_path / "in.onnx", tmp_path / "out" / "model.onnx", "int8", {"a": 1.0, "b": 1.0})
    assert summary["linears_quantized"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.ones((2, 16), np.float32)
    assert len(run(onnx.load(str(tmp_path / "out" / "model.onnx")), x)) == 3

    old, _ = two_linear_graph(opset=17)
    onnx.save_model(old, str(tmp_path / "old.onnx"))
    with pytest.raises(BadInput, match="opset 19"):
        quantize_graph(tmp_path / "old.onnx", tmp_path / "refused" / "model.onnx", "int8", {"a": 1.0})
    assert not (tmp_path / "refused").exists()


# -- calibration --------------------------------------------------------------------


def test_activation_ranges_are_the_largest_inputs_and_leave_no_hooks():
    model = make_tiny_model("llama")
    linears = named_linears(model)
    windows = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    ranges = activation_ranges(model, windows, linears)
    assert set(ranges) == {name for name, _ in linears} and all(value > 0 for value in ranges.values())
    assert all(not linear._forward_pre_hooks for _, linear in linears)

    seen = []
    q_proj = dict(linears)["model.layers.0.self_attn.q_proj"]
    handle = q_proj.register_forward_pre_hook(lambda _module, args: seen.append(float(args[0].abs().max())))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    handle.remove()
    assert len(seen) == 2 and ranges["model.layers.0.self_attn.q_proj"] == pytest.approx(max(seen))
