"""A second graph for timing: the decoder's graph with logits for the last position only.

A serving engine computes the LM head for the last position after a prefill, not for
every prompt position (for SmolLM2 the head over 512 positions is about a tenth of the
prefill's work). Quality windows need every position's logits and use the full graph;
latency is timed on this one. It references the full graph's external weights (nothing
is copied) and is checked against the full graph in ONNX Runtime before use.
"""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.errors import SparsedeployError

LAST_GRAPH = "model.last.onnx"

# A head that ONNX Runtime quantized to 4 bits is a MatMulNBits; its input 0 is the
# activation either way.
_HEAD_OPS = {"MatMul", "MatMulNBits"}
# Ops between the LM head and the logits that act on each position by itself (a cast,
# a soft-cap, a scale), so slicing the head's input to the last position is exact.
_POSITIONWISE = {"Cast", "Identity", "Tanh", "Mul", "Div", "Add", "Sub", "DequantizeLinear", "QuantizeLinear"}


def write_last_position_graph(model_path: Path, target: Path) -> dict:
    """Write ``target``: ``model_path``'s graph (same external weights, not copied) with
    logits for the last position only, [batch, 1, vocab]. The Slice goes on the LM
    head's input when the head is a MatMul reached from the logits through position-wise
    ops, so the head runs on one position (the saving a serving engine makes); otherwise,
    or if that graph does not check out, on the logits themselves. Checked against the
    full graph in ONNX Runtime."""
    import onnx

    failure = ""
    for at_head in (True, False):
        proto = onnx.load(str(model_path), load_external_data=False)
        where = _slice_last_position(proto, at_head)
        if where is None:
            continue
        onnx.save(proto, str(target))  # initializers stay external, pointing at model.onnx.data
        try:
            onnx.checker.check_model(str(target))
            diff = _check_last_graph(model_path, target)
        except Exception as error:  # a wrong guess about the head: try the plain slice
            failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            target.unlink()
            continue
        return {"slice_at": where, "max_abs_diff_vs_full": diff}
    raise SparsedeployError(f"could not build the last-position graph of '{model_path}' ({failure}); report this")


def _slice_last_position(proto, at_head: bool) -> str | None:
    """Insert the Slice in place (see write_last_position_graph); returns where, or None
    when ``at_head`` and no MatMul head is found."""
    import numpy as np
    from onnx import TensorProto, helper

    graph = proto.graph
    head = _lm_head_matmul(graph) if at_head else None
    if at_head and head is None:
        return None
    starts = helper.make_tensor("last_position.starts", TensorProto.INT64, [1], [-1])
    ends = helper.make_tensor("last_position.ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max])
    axes = helper.make_tensor("last_position.axes", TensorProto.INT64, [1], [1])
    graph.initializer.extend([starts, ends, axes])
    if head is not None:
        sliced = head.input[0] + ".last_position"
        slice_node = helper.make_node("Slice", [head.input[0], starts.name, ends.name, axes.name], [sliced], name="last_position")
        head.input[0] = sliced
        position = list(graph.node).index(head)  # right before the head: its input exists by then
        where = "lm_head input"
    else:
        full = "logits.all_positions"
        for node in graph.node:
            node.output[:] = [full if out == "logits" else out for out in node.output]
        slice_node = helper.make_node("Slice", [full, starts.name, ends.name, axes.name], ["logits"], name="last_position")
        position = len(graph.node)
        where = "logits"
    graph.node.insert(position, slice_node)
    del graph.value_info[:]  # stale intermediate shapes would contradict the new seq dim of 1
    logits = next(v for v in graph.output if v.name == "logits")
    logits.type.tensor_type.shape.dim[1].ClearField("dim_param")
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    return where


def _lm_head_matmul(graph):
    """The MatMul that produces the logits, directly or through position-wise ops."""
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    value = "logits"
    for _ in range(6):
        node = producers.get(value)
        if node is None:
            return None
        if node.op_type in _HEAD_OPS:
            return node
        dynamic = [name for name in node.input if name and name not in constants]
        if node.op_type not in _POSITIONWISE or len(dynamic) != 1:
            return None
        value = dynamic[0]
    return None


def _check_last_graph(full: Path, last: Path) -> float:
    """Run both graphs in ONNX Runtime (one at a time: a large model's weights are
    loaded twice) on a small input; the last graph's logits must equal the full
    graph's last row."""
    import numpy as np
    import onnxruntime

    from sparsedeploy.export.onnx_decoder import past_dtype

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    results = []
    for path in (full, last):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feeds[value.name] = np.array([[3, 1, 4]], np.int64)
            elif value.name == "attention_mask":
                feeds[value.name] = np.array([[0, 1, 1, 1]], np.int64)  # one masked past slot, as the worker feeds
            elif value.name == "position_ids":
                feeds[value.name] = np.arange(3, dtype=np.int64)[None]
            else:
                feeds[value.name] = np.zeros((1, value.shape[1], 1, value.shape[3]), past_dtype(session))
        results.append(session.run(["logits"], feeds)[0])
        del session
    want, got = results[0][:, -1:], results[1]
    if got.shape != want.shape:
        raise SparsedeployError(f"the last-position graph gives logits of shape {list(got.shape)}, not {list(want.shape)}")
    diff = float(np.abs(got - want).max())
    if diff > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise SparsedeployError(f"the last-position graph does not match the full graph (max |diff| {diff:.3g})")
    return diff
