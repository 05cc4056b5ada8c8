"""ONNX quantization for the CPU targets, run in the real ONNX Runtime (no mocks): each
scheme's graph runs (prefill and a decode step) close to the float export, pruned zeros
survive exactly and are measured in the quantized graph, static schemes really use their
calibration, and bad input is refused with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import make_tiny_model, tiny_configs
from sparsedeploy.errors import BadInput
from sparsedeploy.export.onnx_decoder import DATA_FILE, MODEL_FILE, export_decoder, initializer_sparsity
from sparsedeploy.export.onnx_quantize import (
    SCHEMES,
    STATIC_SCHEMES,
    calibration_feeds_from_windows,
    quantize_onnx,
)
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.masks import nm_mask
from sparsedeploy.prune.patterns import parse_nm

# What each scheme must turn the linear layers into (and the op that holds the weight).
QUANTIZED_OP = {
    "int8-dynamic": "MatMulInteger",
    "int8-static-qdq": "DequantizeLinear",
    "int8-static-qoperator": "QLinearMatMul",
    "int4-weight-only": "MatMulNBits",
}
# Logit error bounds, relative to the float export's logits: RMS error / mean per-position
# standard deviation over the vocabulary, and top-1 agreement, on held-out random tokens.
# Measured on the tiny random Llama with each scheme's defaults (8 x 32 tokens): int8
# 0.017-0.021 and top-1 0.97; int4 (block 32) 0.089 and 0.83. Another random model of the
# same shape scores 1.4 and 0.0, so the bounds (about 3x the measured error) separate
# "quantized" from "broken".
MAX_RELATIVE_RMS = {"int8": 0.06, "int4": 0.22}
MIN_TOP1 = {"int8": 0.9, "int4": 0.75}


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small model on a shared machine
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tokens(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def prune_2_4(model) -> None:
    """2:4 along the input dimension (the columns of torch's weight[out, in]) of every
    decoder linear layer, by magnitude."""
    with torch.no_grad():
        for linear in adapter_for(model).linear_sublayers():
            weight = linear.module.weight
            weight.mul_(nm_mask(weight.abs(), parse_nm("2:4")))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Float exports of a dense and a 2:4-pruned tiny Llama (untied LM head), and of a
    dense one with a tied head."""
    root = tmp_path_factory.mktemp("float")
    dense = make_tiny_model("llama")
    pruned = make_tiny_model("llama")
    prune_2_4(pruned)
    config = tiny_configs()["llama"]
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_config(config).eval()
    return {name: export_decoder(model, root / name) for name, model in
            (("dense", dense), ("pruned", pruned), ("tied", tied))}


def quantize(exported, directory, scheme, calibration=None, **kwargs):
    directory.mkdir()
    feeds = None
    if scheme in STATIC_SCHEMES:
        windows = tokens(4, 32, seed=0) if calibration is None else calibration
        feeds = calibration_feeds_from_windows(windows, exported.path)
    return quantize_onnx(exported.path, directory, scheme, calibration_feeds=feeds, **kwargs)


def logits(path, windows: torch.Tensor) -> np.ndarray:
    sess = session(path)
    return np.concatenate([sess.run(["logits"], feed)[0] for feed in calibration_feeds_from_windows(windows, path)])


def relative_rms(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(((actual - expected) ** 2).mean()) / expected.std(axis=-1).mean())


# -- each scheme runs, close to float ---------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_runs_in_ort_close_to_float(tmp_path, exports, scheme):
    exported = exports["dense"]
    result = quantize(exported, tmp_path / "q", scheme)

    assert result.path == tmp_path / "q" / MODEL_FILE and result.scheme == scheme
    assert result.files == [MODEL_FILE, DATA_FILE] == sorted(p.name for p in (tmp_path / "q").iterdir())
    assert result.bytes == sum((tmp_path / "q" / name).stat().st_size for name in result.files)
    # The quantized linear weights shrink 4x (int8) or 6.4x (4 bits + a float scale per 32);
    # the rest stays float (for int8, the MLP down projections too).
    quantized_bytes = 4 * sum(np.prod(w["shape"]) for w in exported.sparsity["linear_weights"]
                              if scheme.startswith("int4") or "down_proj" not in w["name"])
    saved = (exported.path.with_name(DATA_FILE).stat().st_size - result.path.with_name(DATA_FILE).stat().st_size)
    assert saved / quantized_bytes > (0.8 if scheme.startswith("int4") else 0.7)
    assert result.seconds > 0 and result.source == str(exported.path)
    proto = onnx.load(str(result.path), load_external_data=False)
    assert proto.ir_version <= 9 and [o.version for o in proto.opset_import if o.domain == ""] == [17]
    for init in proto.graph.initializer:  # relative external data: the directory can move
        if init.data_location == onnx.TensorProto.EXTERNAL:
            assert {e.key: e.value for e in init.external_data}["location"] == DATA_FILE

    # The linear layers, and only those, became the scheme's quantized op; the LM head and,
    # at int8, the MLP down projections (one per layer) stayed float.
    ops = [node.op_type for node in proto.graph.node]
    linears = len(adapter_for(make_tiny_model("llama")).linear_sublayers())
    float_linears = 0 if scheme.startswith("int4") else 2
    if scheme == "int8-static-qdq":
        inits = {init.name for init in proto.graph.initializer}
        weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        assert len(weights) == linears - float_linears
    else:
        assert ops.count(QUANTIZED_OP[scheme]) == linears - float_linears
    if scheme == "int8-dynamic":  # DeepSparse needs B's zero point spelled out
        assert all(len(n.input) == 4 and n.input[3] for n in proto.graph.node if n.op_type == "MatMulInteger")
    float_matmuls = [n.name for n in proto.graph.node
                     if n.op_type == "MatMul" and not n.input[1].endswith("_DequantizeLinear_Output")]
    assert len(float_matmuls) == 2 * 2 + 1 + float_linears  # attention's two products per layer, the LM head
    assert "/model/lm_head/MatMul" in float_matmuls and "/model/lm_head/MatMul" in result.settings["nodes_to_exclude"]
    assert sum(name.endswith("mlp/down_proj/MatMul") for name in float_matmuls) == float_linears
    assert result.settings["float_layers"] == (["lm_head"] if scheme.startswith("int4") else ["lm_head", "mlp_down"])

    # Symmetric weights: the zero point is the middle of the integer range.
    report = result.sparsity
    assert report["num_linear_weights"] == linears
    for weight in report["linear_weights"]:
        quantization = weight["quantization"]
        if quantization is None:
            assert "down_proj" in weight["name"] and weight["dtype"] == "float32" and float_linears, weight["name"]
            continue
        assert quantization["format"] == ("QDQ" if scheme == "int8-static-qdq" else QUANTIZED_OP[scheme])
        assert quantization["zero_point"] == (8 if scheme.startswith("int4") else 0), weight["name"]
        assert quantization["granularity"] == ("per-block" if scheme.startswith("int4") else "per-tensor")
        assert weight["dtype"] == ("uint4" if scheme.startswith("int4") else "int8")
    assert report["lm_head"]["dtype"] == "float32" and report["lm_head"]["quantization"] is None

    # Logits against the float export (held-out tokens, not the calibration ones).
    held_out = tokens(4, 32, seed=100)
    expected, actual = logits(exported.path, held_out), logits(result.path, held_out)
    bits = scheme[:4]
    assert relative_rms(actual, expected) < MAX_RELATIVE_RMS[bits]
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= MIN_TOP1[bits]

    # The KV cache works: prefill 7 tokens, then decode the 8th on the returned presents.
    feeds = calibration_feeds_from_windows(held_out[:1, :7], result.path)[0]
    sess = session(result.path)
    prefill = sess.run(None, feeds)
    past = {name: value for name, value in zip(
        [n for n in feeds if n.startswith("past_key_values.")], prefill[1:])}
    step = sess.run(["logits"], {"input_ids": held_out[:1, 7:8].numpy(), "attention_mask": np.ones((1, 8), np.int64),
                                 "position_ids": np.array([[7]]), **past})[0]
    assert relative_rms(step[:, -1], expected[:1, 7]) < MAX_RELATIVE_RMS[bits] * 2


def test_dense_weights_measure_little_sparsity(tmp_path, exports):
    """Quantization itself makes some zeros: weights under half a quantization step round
    to the zero point. Few at 8 bits per tensor, many more at 4 bits (scale = block absmax / 8)."""
    for scheme in SCHEMES:
        report = quantize(exports["dense"], tmp_path / scheme, scheme).sparsity
        assert report["sparsity"] < (0.2 if scheme.startswith("int4") else 0.03), scheme
        assert report["compliance"]["2:4"] < 0.1, scheme


# -- pruned zeros survive ---------------------------------------------------------------


def unpacked_nbits(packed: np.ndarray, k: int) -> np.ndarray:
    """MatMulNBits' 4-bit B [N, blocks, blob] as [N, K], the slow obvious way."""
    rows = []
    for column in packed.reshape(packed.shape[0], -1):
        values = []
        for byte in column:
            values += [int(byte) & 0xF, int(byte) >> 4]  # low nibble first
        rows.append(values[:k])
    return np.array(rows)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_2_4_sparsity_survives_quantization(tmp_path, exports, scheme):
    exported = exports["pruned"]
    assert exported.sparsity["sparsity"] == 0.5
    result = quantize(exported, tmp_path / "q", scheme)
    report = result.sparsity
    assert report == initializer_sparsity(result.path)  # measured in the written file
    assert report["num_linear_weights"] == exported.sparsity["num_linear_weights"]
    assert report["compliance"] == {"2:4": 1.0, "4:8": 1.0}
    # Exactly the pruned zeros at 8 bits (plus rare tiny weights rounding to zero);
    # at 4 bits more weights round to zero, never fewer.
    assert 0.5 <= report["sparsity"] <= (0.6 if scheme.startswith("int4") else 0.51)
    for weight in report["linear_weights"]:
        assert weight["compliance"] == {"2:4": 1.0, "4:8": 1.0}, weight["name"]
        assert weight["zero_fraction"] >= 0.5, weight["name"]

    # Position by position, read straight from the stored integers: every pruned (float
    # zero) weight is stored as its zero point (0 for int8, 8 for 4 bits).
    floats = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(exported.path)).graph.initializer}
    proto = onnx.load(str(result.path))
    stored = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    checked = 0
    for name, value in floats.items():
        if name.startswith("model.layers.") and value.ndim == 2:  # the decoder's [in, out] weights
            if scheme.startswith("int4"):
                quantized, zero = unpacked_nbits(stored[f"{name}_Q4"], value.shape[0]).T, 8
            elif "down_proj" in name:  # left float at int8
                quantized, zero = stored[name], 0.0
            else:
                quantized, zero = stored[f"{name}_quantized"], 0
            assert quantized.shape == value.shape
            assert np.all(quantized[value == 0] == zero), name
            checked += 1
    assert checked == report["num_linear_weights"]


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static-qdq"])
def test_quantized_sparsity_is_measured_after_ort_fuses_the_graph(tmp_path, exports, scheme):
    """ORT's graph optimiser rewrites quantized graphs (DynamicQuantizeMatMul,
    MatMulIntegerToFloat, QLinearMatMul): an artifact saved after it still measures."""
    result = quantize(exports["pruned"], tmp_path / "q", scheme)
    optimised = result.directory / "optimised.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimised)
    options.log_severity_level = 3
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(optimised), load_external_data=False).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"}  # really fused
    report = initializer_sparsity(optimised)
    assert report["num_linear_weights"] == result.sparsity["num_linear_weights"]
    assert report["sparsity"] == result.sparsity["sparsity"] and report["compliance"] == {"2:4": 1.0, "4:8": 1.0}


def test_float_layers_choose_what_stays_float(tmp_path, exports):
    exported = exports["pruned"]
    everything = quantize(exported, tmp_path / "all", "int8-dynamic", float_layers=())
    assert everything.settings["float_layers"] == [] and everything.settings["nodes_to_exclude"] == []
    report = everything.sparsity
    assert all(w["dtype"] == "int8" for w in report["linear_weights"])
    assert report["lm_head"]["dtype"] == "int8" and not report["lm_head"]["shared_with_embedding"]
    assert report["compliance"] == {"2:4": 1.0, "4:8": 1.0}

    head_only = quantize(exported, tmp_path / "head", "int4-weight-only", float_layers=["mlp_down", "lm_head"])
    floats = [w["name"] for w in head_only.sparsity["linear_weights"] if w["quantization"] is None]
    assert sorted(floats) == [f"model.layers.{i}.mlp.down_proj.weight.T" for i in range(2)]  # found from shapes, not names
    with pytest.raises(BadInput, match="float_layers \\['embedding'\\] unknown; choose from lm_head, mlp_down"):
        quantize(exported, tmp_path / "bad", "int8-dynamic", float_layers=["embedding"])


def test_tied_lm_head_stays_one_float_table(tmp_path, exports):
    exported = exports["tied"]
    assert exported.sparsity["lm_head"]["shared_with_embedding"]
    for scheme in SCHEMES:
        report = quantize(exported, tmp_path / scheme, scheme).sparsity
        head = report["lm_head"]
        assert head["shared_with_embedding"] and head["quantization"] is None, scheme
        assert report["tied_embeddings"] and not report["lm_head_duplicated"], scheme
        assert report["num_linear_weights"] == exported.sparsity["num_linear_weights"], scheme


# -- calibration -------------------------------------------------------------------------


def activation_scales(path) -> dict[str, float]:
    """Scale of every quantized activation (not weight): QuantizeLinear's, and
    QLinearMatMul's A and Y scales."""
    proto = onnx.load(str(path))
    inits = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    names = set()
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            names.add(node.input[1])
        elif node.op_type == "QLinearMatMul":
            names.update((node.input[1], node.input[6]))
    return {name: float(inits[name]) for name in names}


@pytest.mark.parametrize("scheme", STATIC_SCHEMES)
def test_static_schemes_are_calibrated_on_the_feeds(tmp_path, exports, scheme):
    exported = exports["dense"]
    varied = quantize(exported, tmp_path / "varied", scheme, calibration=tokens(4, 32, seed=0))
    repeated = quantize(exported, tmp_path / "repeated", scheme, calibration=torch.full((2, 8), 7))
    assert varied.settings["calibration_samples"] == 4 and repeated.settings["calibration_samples"] == 2
    first, second = activation_scales(varied.path), activation_scales(repeated.path)
    assert first.keys() == second.keys() and len(first) >= 9  # one per distinct linear input at least
    assert sum(first[name] != second[name] for name in first) >= len(first) // 2
    weights = [w["name"] for w in varied.sparsity["linear_weights"]]
    assert weights == [w["name"] for w in repeated.sparsity["linear_weights"]]


def test_calibration_feeds_are_prefills(tmp_path, exports):
    exported = exports["dense"]
    windows = tokens(3, 5, seed=1)
    feeds = calibration_feeds_from_windows(windows, exported.path)
    from_numpy = calibration_feeds_from_windows(windows.numpy(), exported.path)
    assert len(feeds) == len(from_numpy) == 3
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, from_numpy))
    for row, feed in zip(windows, feeds):
        assert set(feed) == set(exported.input_names)
        np.testing.assert_array_equal(feed["input_ids"], row[None].numpy())
        assert feed["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(feed["attention_mask"], np.ones((1, 5), np.int64))
        np.testing.assert_array_equal(feed["position_ids"], np.arange(5)[None])
        assert feed["past_key_values.1.value"].shape == (1, exported.kv_heads, 0, exported.head_dim)
        assert feed["past_key_values.1.value"].dtype == np.float32
    session(exported.path).run(["logits"], feeds[0])

    static = export_decoder(make_tiny_model("llama"), tmp_path / "static", static_shapes={"seq": 1}, verify=False)
    with pytest.raises(BadInput, match="static shape.*export with dynamic shapes"):
        calibration_feeds_from_windows(windows, static.path)
    with pytest.raises(BadInput, match=r"outside \[0, 256\)"):
        calibration_feeds_from_windows(windows + 300, exported.path)
    with pytest.raises(BadInput, match=r"token ids \[n, seqlen\]"):
        calibration_feeds_from_windows(windows[0], exported.path)


# -- errors --------------------------------------------------------------------------------


def test_bad_input_is_refused_in_one_line(tmp_path, exports):
    src = exports["dense"].path
    empty = tmp_path / "empty"
    empty.mkdir()
    feeds = calibration_feeds_from_windows(tokens(1, 4, seed=0), src)
    cases = [
        (dict(src=src, dst_dir=empty, scheme="int8"), "scheme 'int8' is unknown; use one of int8-dynamic"),
        (dict(src=tmp_path / "missing.onnx", dst_dir=empty, scheme="int8-dynamic"), "does not exist"),
        (dict(src=src, dst_dir=tmp_path / "nowhere", scheme="int8-dynamic"), "create an empty directory"),
        (dict(src=src, dst_dir=src.parent, scheme="int8-dynamic"), "is not empty"),
        (dict(src=src, dst_dir=empty, scheme="int8-static-qdq"), "needs calibration_feeds"),
        (dict(src=src, dst_dir=empty, scheme="int8-dynamic", calibration_feeds=feeds), "takes no calibration_feeds"),
        (dict(src=src, dst_dir=empty, scheme="int4-weight-only", block_size=24), "power of two >= 16"),
        (dict(src=src, dst_dir=empty, scheme="int8-static-qoperator", calibration_feeds=[]), "is empty"),
        (dict(src=src, dst_dir=empty, scheme="int8-static-qoperator",
              calibration_feeds=[{"input_ids": feeds[0]["input_ids"]}]), "missing"),
        (dict(src=src, dst_dir=empty, scheme="int8-static-qdq",
              calibration_feeds=[{**feeds[0], "input_ids": feeds[0]["input_ids"].astype(np.float32)}]),
         "calibration feeds do not run in ONNX Runtime"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInput) as error:
            quantize_onnx(**kwargs)
        assert message in str(error.value) and "\n" not in str(error.value), kwargs
    assert not list(empty.iterdir())


def test_int4_is_byte_identical_to_ort_matmul_nbits_quantizer(tmp_path, exports):
    """quantize_onnx packs 4-bit weights with ORT's own kernel rather than importing
    matmul_nbits_quantizer (which needs onnx_ir, installed by the dev extra: a missing one
    is a broken install, not a reason to skip); the two must write the same graph."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)  # undo the module's logging.basicConfig(level=INFO)
    root.handlers[:] = handlers
    exported = exports["dense"]
    for block_size in (32, 128):  # 128 > K = 64: a padded block
        ours = quantize(exported, tmp_path / str(block_size), "int4-weight-only", block_size=block_size)
        theirs = MatMulNBitsQuantizer(onnx.load(str(exported.path)), bits=4, block_size=block_size, is_symmetric=True,
                                      nodes_to_exclude=ours.settings["nodes_to_exclude"])
        theirs.process()
        expected = {i.name: numpy_helper.to_array(i) for i in theirs.model.model.graph.initializer}
        actual = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ours.path)).graph.initializer}
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert actual[name].dtype == value.dtype and np.array_equal(actual[name], value), name
        nodes = [n for n in onnx.load(str(ours.path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
        wanted = [n for n in theirs.model.model.graph.node if n.op_type == "MatMulNBits"]
        assert [(n.name, list(n.input), list(n.output), n.attribute) for n in nodes] == \
            [(n.name, list(n.input), list(n.output), n.attribute) for n in wanted]


# -- the last-position graph that latency is timed on -----------------------------------


@pytest.mark.parametrize("scheme", [None, "int8-dynamic", "int4-weight-only"])
def test_last_position_graph_slices_before_the_head_and_matches_the_full_graph(tmp_path, exports, scheme):
    from sparsedeploy.export.last_position import LAST_GRAPH, write_last_position_graph

    import shutil

    exported = exports["pruned"]
    if scheme is None:  # a copy: the module's float export stays as the other tests expect it
        full = Path(shutil.copytree(exported.path.parent, tmp_path / "float")) / MODEL_FILE
    else:
        full = quantize(exported, tmp_path / "q", scheme).path
    before = sorted(p.name for p in full.parent.iterdir())
    checked = write_last_position_graph(full, full.parent / LAST_GRAPH)

    # The head (a float MatMul, or MatMulNBits at int4) runs on one position, and the new
    # graph shares the weights file instead of copying it.
    assert checked["slice_at"] == "lm_head input"
    assert sorted(p.name for p in full.parent.iterdir()) == sorted(before + [LAST_GRAPH])
    def external(path):
        return sorted(init.name for init in onnx.load(str(path), load_external_data=False).graph.initializer
                      if init.data_location == onnx.TensorProto.EXTERNAL)
    assert external(full.parent / LAST_GRAPH) == external(full) != []
    windows = tokens(2, 24, seed=5)
    for feed in calibration_feeds_from_windows(windows, full):
        want = session(full).run(["logits"], feed)[0][:, -1:]
        got = session(full.parent / LAST_GRAPH).run(["logits"], feed)[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
