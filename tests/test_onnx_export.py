"""The shared ONNX exporter, checked with the real ONNX Runtime (no mocks): prefill and
decode through the KV cache match torch, static shapes, sparsity that survives export
and ORT's graph optimisation, external data, and clear errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_tiny_model, tiny_configs
from sparsedeploy.errors import BadInput
from sparsedeploy.export.onnx_decoder import (
    DATA_FILE,
    MODEL_FILE,
    VERIFIED_ARCHITECTURES,
    _lower_ir_version,
    export_decoder,
    initializer_sparsity,
)
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.patterns import nm_compliance, parse_nm

ATOL = 1e-4


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small model on a shared machine
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_past(result, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
    return {
        name: np.zeros((batch, result.kv_heads, 0, result.head_dim), dtype)
        for name in result.input_names
        if name.startswith("past_key_values.")
    }


def prefill_then_decode(model, result, tokens: torch.Tensor, attention_mask: np.ndarray | None = None, dtype=np.float32):
    """ORT prefill of all but the last token (empty past), then one decode step that
    feeds the returned presents as past. Returns (prefill outputs, decode outputs)."""
    batch, total = tokens.shape
    mask = np.ones((batch, total), np.int64) if attention_mask is None else attention_mask
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    sess = session(result.path)
    prefill = sess.run(None, {
        "input_ids": tokens[:, :-1].numpy(),
        "attention_mask": mask[:, :-1],
        "position_ids": positions[:, :-1],
        **empty_past(result, batch, dtype),
    })
    past = dict(zip((n for n in result.input_names if n.startswith("past_key_values.")), prefill[1:]))
    decode = sess.run(None, {
        "input_ids": tokens[:, -1:].numpy(),
        "attention_mask": mask,
        "position_ids": positions[:, -1:],
        **past,
    })
    return prefill, decode


# -- numerics: prefill and decode through the KV cache --------------------------------


@pytest.mark.parametrize("model_type", VERIFIED_ARCHITECTURES)
def test_prefill_and_decode_match_torch(tmp_path, model_type):
    model = make_tiny_model(model_type)
    adapter = adapter_for(model)
    geometry = adapter.geometry()
    result = export_decoder(model, tmp_path / "onnx")

    assert result.path == tmp_path / "onnx" / MODEL_FILE and result.path.is_file()
    assert (result.num_layers, result.kv_heads, result.head_dim) == (
        adapter.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert result.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert result.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert result.output_names[:3] == ["logits", "present.0.key", "present.0.value"]
    assert len(result.input_names) == 3 + 2 * adapter.num_layers == len(result.output_names) + 2
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL

    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 8))  # batch 2: a 7-token prefill, then 1 decode step
    with torch.no_grad():
        expected = model(tokens).logits.numpy()
    prefill, decode = prefill_then_decode(model, result, tokens)

    assert prefill[0].shape == (2, 7, 256)
    np.testing.assert_allclose(prefill[0], expected[:, :7], atol=ATOL, rtol=0)
    assert all(p.shape == (2, geometry.num_kv_heads, 7, geometry.head_dim) for p in prefill[1:])
    assert decode[0].shape == (2, 1, 256)
    np.testing.assert_allclose(decode[0][:, -1], expected[:, 7], atol=ATOL, rtol=0)
    assert all(p.shape == (2, geometry.num_kv_heads, 8, geometry.head_dim) for p in decode[1:])


@pytest.mark.parametrize("model_type", VERIFIED_ARCHITECTURES)
def test_float16_graph_tracks_the_float32_model_and_leaves_it_alone(tmp_path, model_type):
    """TensorRT's graph: float16 weights, cache and logits, traced from a half copy."""
    model = make_tiny_model(model_type)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attention = model.config._attn_implementation
    result = export_decoder(model, tmp_path / "onnx", dtype=torch.float16)

    assert result.dtype == "float16" and 0 < result.max_abs_diff
    assert model.config._attn_implementation == attention  # the eager switch was the copy's
    assert all(p.dtype == torch.float32 and torch.equal(p, before[name]) for name, p in model.named_parameters())
    proto = onnx.load(str(result.path), load_external_data=False)
    weights = [init for init in proto.graph.initializer if init.name.endswith(".weight.T")]
    assert weights and {init.data_type for init in weights} == {onnx.TensorProto.FLOAT16}
    io_types = {value.name: value.type.tensor_type.elem_type for value in [*proto.graph.input, *proto.graph.output]}
    assert {io_types[name] for name in result.input_names[3:] + result.output_names} == {onnx.TensorProto.FLOAT16}

    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = model(tokens).logits.numpy()
    prefill, decode = prefill_then_decode(model, result, tokens, dtype=np.float16)
    assert prefill[0].dtype == np.float16 and all(p.dtype == np.float16 for p in decode[1:])
    scale = float(np.abs(expected).max())
    assert np.abs(prefill[0].astype(np.float32) - expected[:, :7]).max() < 2e-2 * scale
    assert np.abs(decode[0][:, -1].astype(np.float32) - expected[:, 7]).max() < 2e-2 * scale


def test_left_padding_and_sliding_window(tmp_path):
    """The attention mask is a real graph input (not baked at trace time), and a sliding
    window shorter than the sequence is honoured in prefill and decode."""
    config = tiny_configs()["mistral"]
    config.sliding_window = 4
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    result = export_decoder(model, tmp_path / "onnx")
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = np.ones((2, 8), np.int64)
    mask[0, :3] = 0  # row 0 is left-padded by 3
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        expected = model(tokens, attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions)).logits.numpy()
    prefill, decode = prefill_then_decode(model, result, tokens, mask)
    real = mask[:, :7].astype(bool)
    np.testing.assert_allclose(prefill[0][real], expected[:, :7][real], atol=ATOL, rtol=0)
    np.testing.assert_allclose(decode[0][:, -1], expected[:, 7], atol=ATOL, rtol=0)


def test_static_shapes_opset17_ir9_and_checker(tmp_path):
    model = make_tiny_model("llama")
    shapes = {"batch": 2, "seq": 1, "past": 6}  # a decode-step engine
    result = export_decoder(model, tmp_path / "static", static_shapes=shapes)

    assert result.static_shapes == shapes
    proto = onnx.load(str(result.path), load_external_data=False)
    assert result.opset == 17 and [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert result.ir_version == proto.ir_version <= 9
    onnx.checker.check_model(str(result.path))  # path form: reads the external data
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name  # nothing symbolic left
    declared = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert declared["input_ids"] == [2, 1] and declared["attention_mask"] == [2, 7]
    assert declared["past_key_values.0.key"] == [2, result.kv_heads, 6, result.head_dim]

    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (2, 7))
    past_kv = torch.randn(2 * result.num_layers, 2, result.kv_heads, 6, result.head_dim)
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(result.num_layers):
        cache.update(past_kv[2 * layer], past_kv[2 * layer + 1], layer)
    with torch.no_grad():
        expected = model(tokens[:, 6:], past_key_values=cache, position_ids=torch.full((2, 1), 6)).logits.numpy()
    feed = {"input_ids": tokens[:, 6:].numpy(), "attention_mask": np.ones((2, 7), np.int64),
            "position_ids": np.full((2, 1), 6, np.int64)}
    feed.update({name: past_kv[i].numpy() for i, name in enumerate(result.input_names[3:])})
    sess = session(result.path)
    logits = sess.run(["logits"], feed)[0]
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(Exception):  # other shapes are refused: the graph really is static
        sess.run(["logits"], {**feed, "input_ids": tokens[:, 5:].numpy()})


def test_ir_version_is_lowered_for_deepsparse(tmp_path):
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    model.ir_version = 10
    _lower_ir_version(model, 17)
    assert model.ir_version == 9
    onnx.checker.check_model(model)
    model.ir_version = 10
    _lower_ir_version(model, 18)  # newer opsets keep what the exporter wrote
    assert model.ir_version == 10


# -- sparsity survives export and graph optimisation ---------------------------------


def prune_2_4_along_input(model) -> list[str]:
    """Zero the 2 smallest |w| of every 4 consecutive weights along the INPUT dimension
    (the columns of torch's weight[out, in]) of every decoder nn.Linear; returns their names."""
    names = []
    with torch.no_grad():
        for linear in adapter_for(model).linear_sublayers():
            weight = linear.module.weight
            rows, cols = weight.shape
            groups = weight.data.view(rows, cols // 4, 4)
            smallest = groups.abs().argsort(dim=-1)[..., :2]
            groups.scatter_(-1, smallest, 0.0)
            assert nm_compliance(weight, parse_nm("2:4")) == 1.0
            names.append(f"{linear.name}.weight")
    return names


@pytest.mark.parametrize("model_type", ["llama", "opt"])  # MatMul ([in, out]) and Gemm transB ([out, in])
def test_2_4_sparsity_survives_export_and_ort_optimisation(tmp_path, model_type):
    model = make_tiny_model(model_type)
    pruned = prune_2_4_along_input(model)
    result = export_decoder(model, tmp_path / "onnx")

    optimised = result.path.parent / "ort-optimised.onnx"  # beside model.onnx: it references the same data file
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])

    for report in (result.sparsity, initializer_sparsity(result.path), initializer_sparsity(optimised)):
        weights = report["linear_weights"]
        assert report["num_linear_weights"] == len(weights) == len(pruned)
        assert {w["name"].removesuffix(".T") for w in weights} == set(pruned)
        for w in weights:
            assert w["compliance"]["2:4"] == 1.0 and w["compliance"]["4:8"] == 1.0, w["name"]
            assert w["zero_fraction"] == 0.5, w["name"]
        assert report["sparsity"] == 0.5
        assert report["compliance"] == {"2:4": 1.0, "4:8": 1.0}
        assert report["lm_head"] is not None and report["lm_head"]["zero_fraction"] < 0.01  # not pruned, not counted
        assert report["embedding"]["shape"] == [256, 64]  # the token table, not OPT's position table

    # The axis matters: MatMul weights are stored [in, out] (input axis 0), Gemm(transB=1)
    # weights [out, in] (input axis 1); along the other axis the pattern does not hold.
    stored = {init.name: onnx.numpy_helper.to_array(init)
              for init in onnx.load(str(result.path)).graph.initializer}
    axes = set()
    for w in result.sparsity["linear_weights"]:
        array = stored[w["name"]]
        axes.add(w["input_axis"])
        assert w["input_axis"] == (0 if w["name"].endswith(".T") else 1)
        wrong_axis = array if w["input_axis"] == 0 else array.T  # rows = inputs
        assert nm_compliance(torch.from_numpy(wrong_axis.copy()), parse_nm("2:4")) < 1.0, w["name"]
    assert axes == ({0} if model_type == "llama" else {0, 1})


def test_tied_lm_head_is_stored_once_or_reported_duplicated(tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_configs()["llama"]
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight

    shared = export_decoder(model, tmp_path / "shared")
    copied = export_decoder(model, tmp_path / "copied", share_tied_embeddings=False)
    assert shared.sparsity["tied_embeddings"] and copied.sparsity["tied_embeddings"]
    assert not shared.sparsity["lm_head_duplicated"] and shared.sparsity["lm_head"]["shared_with_embedding"]
    assert copied.sparsity["lm_head_duplicated"] and not copied.sparsity["lm_head"]["shared_with_embedding"]
    assert copied.bytes - shared.bytes > 256 * 64 * 4 - 1024  # one vocab x hidden float table less (+ a Transpose node)
    assert shared.max_abs_diff < ATOL  # the shared head still computes the same logits

    untied = export_decoder(make_tiny_model("llama"), tmp_path / "untied")
    assert not untied.sparsity["tied_embeddings"] and not untied.sparsity["lm_head_duplicated"]


# -- files ---------------------------------------------------------------------------


def test_external_data_is_relative_and_the_directory_moves(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    result = export_decoder(model, tmp_path / "onnx")
    assert result.files == [MODEL_FILE, DATA_FILE]
    graph_bytes = (tmp_path / "onnx" / MODEL_FILE).stat().st_size
    data_bytes = (tmp_path / "onnx" / DATA_FILE).stat().st_size
    assert result.bytes == graph_bytes + data_bytes and graph_bytes < data_bytes / 2
    proto = onnx.load(str(result.path), load_external_data=False)
    weights = [i for i in proto.graph.initializer if len(i.dims) == 2]  # embeddings and linears
    assert len(weights) >= len(adapter_for(model).linear_sublayers()) + 1
    for init in weights:  # every weight matrix lives in the data file, named relatively
        assert init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data, init.name
        assert {e.key: e.value for e in init.external_data}["location"] == DATA_FILE

    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "onnx"), str(moved))
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    relative = os.path.relpath(moved / MODEL_FILE)
    sess = session(relative)
    tokens = np.arange(10, 15, dtype=np.int64)[None]
    logits = sess.run(["logits"], {"input_ids": tokens, "attention_mask": np.ones_like(tokens),
                                   "position_ids": np.arange(5)[None], **empty_past(result, 1)})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)
    assert initializer_sparsity(relative)["num_linear_weights"] == len(adapter_for(model).linear_sublayers())


def test_single_file_without_external_data(tmp_path):
    result = export_decoder(make_tiny_model("llama"), tmp_path / "onnx", external_data=False)
    assert result.files == [MODEL_FILE]
    session(result.path)


# -- errors --------------------------------------------------------------------------


class UnexportableNorm(torch.nn.Module):
    """Wraps the final norm with an op the TorchScript ONNX exporter has no symbolic for."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        return self.inner(hidden) + 0 * torch.special.i0(hidden)


def test_export_failure_names_architecture_and_first_error_line(tmp_path, capfd):
    model = make_tiny_model("qwen2")
    model.model.norm = UnexportableNorm(model.model.norm)
    with pytest.raises(BadInput) as error:
        export_decoder(model, tmp_path / "onnx")
    message = str(error.value)
    assert "'qwen2'" in message and "aten::i0" in message and "\n" not in message
    assert not (tmp_path / "onnx").exists()
    assert not list(tmp_path.iterdir())  # no staging directory left behind
    assert "Torch IR graph" not in capfd.readouterr().out  # stdout stays clean for --json


def test_bad_arguments_are_bad_input(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(BadInput, match="unknown keys"):
        export_decoder(model, tmp_path / "a", static_shapes={"batch": 1, "sequence": 4})
    with pytest.raises(BadInput, match="integer >= 1"):
        export_decoder(model, tmp_path / "b", static_shapes={"seq": 0})
    with pytest.raises(BadInput, match="opset"):
        export_decoder(model, tmp_path / "c", opset=9)
    with pytest.raises(BadInput, match="float32 or float16, not bfloat16"):
        export_decoder(model, tmp_path / "e", dtype=torch.bfloat16)
    with pytest.raises(BadInput, match="float32"):
        export_decoder(model.to(torch.float16), tmp_path / "d")
    with pytest.raises(BadInput, match="does not exist"):
        initializer_sparsity(tmp_path / "missing.onnx")
    assert not list(tmp_path.iterdir())
