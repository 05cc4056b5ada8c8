"""The tensorrt target without TensorRT: every stage before the engine build (export,
Q/DQ quantization, 2:4 orientation, optimization profiles, precision checks) on tiny
random Llama models, the inspector parser on a hand-written sample of the documented
JSON, and the CLI's exit 3 on a machine without tensorrt or a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import REPOSITORY, make_tiny_model, run_cli, save_checkpoint, small_profile
from sparsedeploy.backends.base import Workload
from sparsedeploy.errors import BadInput, TargetUnavailable
from sparsedeploy.export import tensorrt_engine as stages
from sparsedeploy.export.onnx_decoder import input_names
from sparsedeploy.export.smoothing import smoothquant_alpha
from sparsedeploy.prune.masks import nm_mask
from sparsedeploy.prune.patterns import nm_compliance, parse_nm

SAMPLE = Path(__file__).parent / "testdata" / "tensorrt_engine_information.json"
WORKLOAD = Workload(eval_seqlen=64, eval_windows=2, prompt_tokens=16, new_tokens=4, batches=(2, 8), runs=2, warmup=1, threads=1)
TWO_FOUR = parse_nm("2:4")


def prune_2of4(model, along: str = "input", only: str | None = None):
    """Magnitude 2:4 on every decoder linear (or only the one named ``only``); groups along
    the input dimension as sparse tensor cores need, or along the output one (wrong)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}" and (only is None or name == only):
            weight = module.weight.data  # [out, in]
            keep = nm_mask(weight.abs(), TWO_FOUR) if along == "input" else nm_mask(weight.abs().T, TWO_FOUR).T
            weight.mul_(keep)
    return model


def calibration():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """fp16, int8 and fp8 preparations (float16 graphs; Q/DQ for the last two) of one tiny
    2:4 Llama, and its model."""
    root = tmp_path_factory.mktemp("trt")
    model = prune_2of4(make_tiny_model("llama"))
    prepared = {
        precision: stages.prepare_graphs(model, root / precision, precision, stages.graph_opset(precision, None), calibration,
                                          smoothquant_alpha(None))
        for precision in stages.PRECISIONS
    }
    return {"root": root, "model": model, **prepared}


# -- availability and the command line ---------------------------------------------


def test_build_without_tensorrt_or_gpu_exits_3_naming_what_is_missing(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "tensorrt.toml").write_text(small_profile("tensorrt"))
    checkpoint = save_checkpoint(prune_2of4(make_tiny_model("llama")), tmp_path / "tiny-2of4")
    output = tmp_path / "out"
    result = run_cli("build", "--target", "tensorrt", "--model", str(checkpoint), "-o", str(output),
                     env={"SPARSEDEPLOY_TARGETS": str(targets), "SPARSEDEPLOY_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 3, result.stderr
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1, result.stderr  # one line, nothing else
    assert "tensorrt is not installed" in message[0] and "no CUDA GPU" in message[0]
    assert not output.exists()


def test_targets_lists_tensorrt_as_unavailable_with_the_reason():
    from sparsedeploy.backends.tensorrt_gpu import TensorRTBackend

    availability = TensorRTBackend().availability()
    assert not availability.available
    assert "tensorrt is not installed" in availability.reason and "no CUDA GPU" in availability.reason


def test_non_2of4_checkpoint_is_refused_with_the_prune_command(tmp_path):
    from sparsedeploy.build.pipeline import check_pattern
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.targets import parse_profile

    profile = parse_profile(REPOSITORY / "targets" / "tensorrt.toml")
    checkpoint = resolve_checkpoint(str(save_checkpoint(make_tiny_model("llama"), tmp_path / "tiny")))
    with pytest.raises(BadInput) as refused:
        check_pattern(profile, checkpoint, "unstructured")
    assert refused.value.exit_code == 2
    assert "sparsedeploy prune" in str(refused.value) and "--pattern 2:4" in str(refused.value)
    check_pattern(profile, checkpoint, "2:4")  # accepted


# -- precision against the GPU -------------------------------------------------------


@pytest.mark.parametrize("precision, capability, refused", [
    ("fp16", (7, 5), TargetUnavailable),  # Turing: no sparse tensor cores
    ("int8", (7, 0), TargetUnavailable),
    ("fp8", (7, 5), TargetUnavailable),  # the GPU itself is the problem first
    ("fp8", (8, 0), BadInput),  # A100: sparse, but no FP8
    ("fp8", (8, 6), BadInput),
    ("bf16", (9, 0), BadInput),  # not a tensorrt target precision
    ("fp16", (8, 0), None),
    ("int8", (8, 6), None),
    ("fp8", (8, 9), None),  # Ada
    ("fp8", (9, 0), None),  # Hopper
])
def test_compute_capability_checks(precision, capability, refused):
    if refused is None:
        stages.check_compute_capability(precision, capability, "GPU")
        return
    with pytest.raises(refused) as error:
        stages.check_compute_capability(precision, capability, "GPU")
    assert error.value.exit_code == (3 if refused is TargetUnavailable else 2)
    assert f"sm_{capability[0]}{capability[1]}" in str(error.value) or precision == "bf16"


def test_builder_flags_are_only_sparse_weights_the_graph_carries_precision():
    for precision in stages.PRECISIONS:
        assert stages.builder_flags(precision) == ("SPARSE_WEIGHTS",)
    with pytest.raises(BadInput):
        stages.builder_flags("int4")


def test_graph_opset_per_precision():
    assert stages.graph_opset("fp16", None) == 17 and stages.graph_opset("fp16", 18) == 18
    assert stages.graph_opset("int8", None) == stages.graph_opset("fp8", None) == 19
    assert stages.graph_opset("fp8", 21) == 21
    with pytest.raises(BadInput, match="opset 19"):
        stages.graph_opset("int8", 17)


class _Enum:
    """A stand-in for ``tensorrt.NetworkDefinitionCreationFlag``: members are ints."""

    def __init__(self, **members):
        self.__dict__.update(members)


def test_network_flags_ask_for_a_strongly_typed_network():
    from types import SimpleNamespace

    # TensorRT 10: STRONGLY_TYPED = 1 (bit 1); EXPLICIT_BATCH (0) is implied and deprecated.
    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=_Enum(EXPLICIT_BATCH=0, STRONGLY_TYPED=1))
    assert stages.network_flags(trt10) == 1 << 1
    # A TensorRT without the flag (older than 9.1) cannot build a strongly typed graph.
    with pytest.raises(TargetUnavailable, match="STRONGLY_TYPED"):
        stages.network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=_Enum(EXPLICIT_BATCH=0)))


def test_build_settings_on_a_machine_without_gpu_and_fp8_opset():
    from sparsedeploy.backends.tensorrt_gpu import TensorRTBackend

    settings = TensorRTBackend().build_settings("fp8", WORKLOAD, {"calib": "canterbury"})
    assert settings["opset"] == 19 and settings["flags"] == ["SPARSE_WEIGHTS"] and settings["device"] is None
    assert settings["network"].startswith("strongly typed")
    assert settings["shapes"] == {"prompt_tokens": 16, "new_tokens": 4, "batches": [2, 8], "eval_seqlen": 64}
    with pytest.raises(BadInput, match="opset"):
        TensorRTBackend().build_settings("fp8", WORKLOAD, {"opset": 17})
    assert TensorRTBackend().build_settings("fp16", WORKLOAD, {})["opset"] == 17
    assert TensorRTBackend().build_settings("int8", WORKLOAD, {})["smoothquant_alpha"] == 0.5
    assert TensorRTBackend().build_settings("int8", WORKLOAD, {"smoothquant_alpha": False})["smoothquant_alpha"] is None
    assert "smoothquant_alpha" not in settings


# -- optimization profiles ----------------------------------------------------------


def test_latency_profiles_exact_shapes():
    prefill, decode = stages.latency_profiles(WORKLOAD, num_layers=2, kv_heads=2, head_dim=16)
    assert set(prefill.shapes) == set(decode.shapes) == set(input_names(2))
    past = [name for name in input_names(2) if name.startswith("past_key_values.")]
    # batch 1 .. 8, opt at the first timed batch (2); prompt up to P = 16, empty past.
    assert prefill.shapes["input_ids"] == ((1, 1), (2, 16), (8, 16))
    assert prefill.shapes["position_ids"] == ((1, 1), (2, 16), (8, 16))
    assert prefill.shapes["attention_mask"] == ((1, 1), (2, 16), (8, 16))
    for name in past:
        assert prefill.shapes[name] == ((1, 2, 0, 16), (2, 2, 0, 16), (8, 2, 0, 16))
    # One token onto a past of 1 .. P+G-1 = 19 (opt P + G/2 = 18); total up to P+G = 20.
    assert decode.shapes["input_ids"] == ((1, 1), (2, 1), (8, 1))
    assert decode.shapes["position_ids"] == ((1, 1), (2, 1), (8, 1))
    assert decode.shapes["attention_mask"] == ((1, 2), (2, 19), (8, 20))
    for name in past:
        assert decode.shapes[name] == ((1, 2, 1, 16), (2, 2, 18, 16), (8, 2, 19, 16))


def test_quality_profile_and_fits():
    quality = stages.quality_profile(WORKLOAD, num_layers=1, kv_heads=2, head_dim=16)
    assert quality.shapes["input_ids"] == ((1, 1), (1, 64), (1, 64))
    assert quality.shapes["attention_mask"] == ((1, 1), (1, 64), (1, 64))
    assert quality.shapes["past_key_values.0.key"] == ((1, 2, 0, 16),) * 3
    window = {"input_ids": (1, 64), "position_ids": (1, 64), "attention_mask": (1, 64),
              "past_key_values.0.key": (1, 2, 0, 16), "past_key_values.0.value": (1, 2, 0, 16)}
    assert stages.fits(quality, window)
    assert not stages.fits(quality, {**window, "input_ids": (1, 65)})
    assert not stages.fits(quality, {**window, "input_ids": (2, 64)})
    again = stages.Profile.from_dict(json.loads(json.dumps(quality.to_dict())))
    assert again == quality  # what the artifact record stores comes back the same


def test_profiles_refuse_an_empty_workload():
    with pytest.raises(BadInput, match="new_tokens"):
        stages.latency_profiles(Workload(64, 2, 16, 0, (1,), 2, 1, 1), 1, 2, 16)


# -- export, quantization and 2:4 orientation ---------------------------------------


def test_fp16_build_compiles_a_verified_float16_graph_with_2of4_along_k(graphs):
    prepared = graphs["fp16"]
    proto = onnx.load(str(prepared.full), load_external_data=False)
    weights = [init for init in proto.graph.initializer if init.name.endswith(".weight.T")]
    assert len(weights) == 15 and {init.data_type for init in weights} == {onnx.TensorProto.FLOAT16}
    assert {i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past_")} == {onnx.TensorProto.FLOAT16}
    assert prepared.export["dtype"] == "float16" and prepared.export["opset"] == 17
    assert 0 < prepared.export["max_abs_diff_vs_torch_fp32"] < 5e-2  # checked against float32 PyTorch
    assert prepared.orientation == {"weights": 14, "two_four_along_k": 14, "dense": 0}
    assert prepared.sparsity["compliance"]["2:4"] == 1.0
    assert prepared.last.is_file() and prepared.last_graph["slice_at"] == "lm_head input"
    records = stages.sparse_orientation(prepared.full)
    assert {r["verdict"] for r in records} == {"2:4"} and all(r["input_axis"] == 0 for r in records)


def test_dense_model_passes_as_dense(tmp_path):
    prepared = stages.prepare_graphs(make_tiny_model("llama"), tmp_path / "dense", "fp16", 17)
    assert prepared.sparsity["compliance"]["2:4"] < 1.0
    assert prepared.orientation == {"weights": 14, "two_four_along_k": 0, "dense": 14}


def test_weight_pruned_along_the_output_axis_is_refused(tmp_path):
    model = make_wrong(prune_2of4(make_tiny_model("llama")))
    with pytest.raises(BadInput) as refused:
        stages.prepare_graphs(model, tmp_path / "wrong", "fp16", 17)
    message = str(refused.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "output axis" in message and "\n" not in message


def make_wrong(model):
    """``model`` with layer 1's up_proj holding 2:4 groups along its OUTPUT dimension only."""
    weight = model.model.layers[1].mlp.up_proj.weight.data  # [128, 64]
    weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    prune_2of4(model, along="output", only="model.layers.1.mlp.up_proj")
    assert nm_compliance(weight, TWO_FOUR) < 1.0 and nm_compliance(weight.T, TWO_FOUR) == 1.0
    return model


def test_initializer_transposed_in_the_graph_is_detected(graphs, tmp_path):
    """A square 2:4 weight whose stored data is transposed while the MatMul still reads
    axis 0 as K: its groups now run along N."""
    copy = tmp_path / "graph"
    shutil.copytree(graphs["fp16"].directory, copy)
    proto = onnx.load(str(copy / "model.onnx"), load_external_data=True)
    name = "model.layers.0.self_attn.q_proj.weight.T"
    target = next(init for init in proto.graph.initializer if init.name == name)
    target.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(target).T), name))
    onnx.save_model(proto, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    records = stages.sparse_orientation(copy / "model.onnx")
    verdicts = {r["name"]: r["verdict"] for r in records}
    assert verdicts[name] == "transposed" and list(verdicts.values()).count("2:4") == 13
    with pytest.raises(BadInput, match="q_proj"):
        stages.check_sparse_orientation(records, "model.onnx")


def test_weight_stored_out_in_behind_a_transpose_is_accepted(graphs, tmp_path):
    """Stored [out, in] and transposed by a node on the way to MatMul: groups along the
    stored axis 1 are still along K. The axis comes from the graph, not the shape."""
    from onnx import helper

    copy = tmp_path / "graph"
    shutil.copytree(graphs["fp16"].directory, copy)
    proto = onnx.load(str(copy / "model.onnx"), load_external_data=True)
    name = "model.layers.0.mlp.gate_proj.weight.T"  # [64, 128]: not square, shape alone cannot tell
    target = next(init for init in proto.graph.initializer if init.name == name)
    stored = numpy_helper.to_array(target).T.copy()  # [out, in] = torch's layout
    target.CopyFrom(numpy_helper.from_array(stored, "gate_proj_out_in"))
    proto.graph.node.insert(0, helper.make_node("Transpose", ["gate_proj_out_in"], [name], perm=[1, 0]))
    onnx.save_model(proto, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    records = {r["name"]: r for r in stages.sparse_orientation(copy / "model.onnx")}
    assert records["gate_proj_out_in"]["input_axis"] == 1 and records["gate_proj_out_in"]["verdict"] == "2:4"
    assert stages.check_sparse_orientation(list(records.values()))["two_four_along_k"] == 14


def run_graph(path: Path, window: torch.Tensor) -> np.ndarray:
    """Every position's logits of one window [1, seqlen] through ONNX Runtime (CPU)."""
    import onnxruntime as ort

    from sparsedeploy.export.onnx_decoder import past_dtype

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    length = window.shape[1]
    feeds = {"input_ids": window.numpy(), "attention_mask": np.ones((1, length), np.int64),
             "position_ids": np.arange(length, dtype=np.int64)[None]}
    for name in input_names(2)[3:]:
        feeds[name] = np.zeros((1, 2, 0, 16), past_dtype(session))
    (logits,) = session.run(["logits"], feeds)
    return logits.astype(np.float32)


@pytest.mark.parametrize("precision, element, quantized_linears, tolerance", [
    ("int8", onnx.TensorProto.INT8, 12, 0.05),  # the two MLP down projections stay float16
    ("fp8", onnx.TensorProto.FLOAT8E4M3FN, 14, 0.1),  # every decoder linear
])
def test_quantized_graph_is_symmetric_qdq_that_keeps_2of4_and_tracks_torch(graphs, precision, element, quantized_linears, tolerance):
    prepared = graphs[precision]
    proto = onnx.load(str(prepared.full), load_external_data=True)
    constants = {init.name: init for init in proto.graph.initializer}
    weights = [init for init in proto.graph.initializer if init.name.endswith(".weight.T_quantized")]
    assert len(weights) == quantized_linears == prepared.quantization["linears_quantized"]
    assert {init.data_type for init in weights} == {element}
    assert constants["lm_head.weight.T"].data_type == onnx.TensorProto.FLOAT16
    # Symmetric: every zero point is zero (TensorRT's only form), of the quantized type.
    pairs = [node for node in proto.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    points = [constants[node.input[2]] for node in pairs]
    assert points and {p.data_type for p in points} == {element}
    assert not any(numpy_helper.to_array(p).astype(np.float32).any() for p in points)
    # q, k and v read one activation: one shared pair per distinct activation.
    assert prepared.quantization["activation_pairs"] < quantized_linears
    # The 2:4 pattern is measured in the stored int8 / float8 values themselves.
    assert prepared.orientation["two_four_along_k"] == 14 and prepared.sparsity["compliance"]["2:4"] == 1.0
    quantized = [w for w in prepared.sparsity["linear_weights"] if w["name"].endswith("_quantized")]
    assert len(quantized) == quantized_linears and all(w["compliance"]["2:4"] == 1.0 for w in quantized)
    assert prepared.quantization["calibration_samples"] == 2
    smoothing = prepared.quantization["smoothing"]  # int8: SmoothQuant first; fp8 is not smoothed
    assert (smoothing["groups_smoothed"], smoothing["alpha"]) == (4, 0.5) if precision == "int8" else smoothing is None

    window = calibration()[:1]
    logits = run_graph(prepared.full, window)
    with torch.no_grad():
        expected = graphs["model"](window).logits.numpy()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < tolerance
    assert np.isfinite(logits).all()


def test_quantized_builds_need_calibration(tmp_path):
    with pytest.raises(BadInput, match="calib"):
        stages.prepare_graphs(make_tiny_model("llama"), tmp_path / "int8", "int8", 17, None)


# -- what the engine inspector says --------------------------------------------------


def test_inspector_sample_parses_into_layer_records():
    records = stages.parse_engine_information(SAMPLE.read_text())
    assert len(records) == 46
    gemms = [r for r in records if r["gemm"]]
    assert len(gemms) == 30 and {r["profile"] for r in gemms} == {0, 1}
    sparse = [r for r in gemms if r["sparse_tactic"]]
    assert len(sparse) == 8 and all(r["profile"] == 0 for r in sparse)
    assert "sptensor" in sparse[0]["tactic"]
    head = [r for r in gemms if r["name"] == "/lm_head/MatMul"]
    assert len(head) == 2 and not any(r["sparse_tactic"] or r["sparse_weights"] for r in head)
    assert sum(r["opaque"] for r in records) == 4
    pointwise = next(r for r in records if r["type"] == "PointWiseV2")
    assert not pointwise["gemm"] and not pointwise["sparse_tactic"]  # a tactic name, but no GEMM
    assert not any(r["name"].endswith("]") and "[profile" in r["name"] for r in records)


def test_inspector_json_of_tensorrt_11_parses_the_same():
    """TensorRT 11 replaced "Bindings" (names) by "I/O Tensors" (objects) and split each
    tensor's "Format/Datatype" into "Format" and "DataType"; the layer fields the parser
    reads did not change."""
    data = json.loads(SAMPLE.read_text())
    data["I/O Tensors"] = [{"Name": name, "IOMode": "Input" if name.startswith(("input", "attention", "position", "past"))
                            else "Output", "DataType": "Half", "Location": "Device"} for name in data.pop("Bindings")]
    for layer in data["Layers"]:
        for tensor in [*layer.get("Inputs", []), *layer.get("Outputs", [])]:
            described = tensor.pop("Format/Datatype", None)
            if described is not None:
                tensor["Format"], tensor["DataType"] = described, "Half"
    assert stages.parse_engine_information(json.dumps(data)) == stages.parse_engine_information(SAMPLE.read_text())


def test_kernel_evidence_used_only_when_the_inspector_names_sparse_tactics():
    log = stages.parse_sparsity_log([
        "(Sparsity) Layers eligible for sparse math: /model/layers.0/mlp/up_proj/MatMul, /model/layers.1/mlp/up_proj/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: /model/layers.0/mlp/up_proj/MatMul",
        "some other message",
    ])
    assert log == {"eligible": ["/model/layers.0/mlp/up_proj/MatMul", "/model/layers.1/mlp/up_proj/MatMul"],
                   "picked": ["/model/layers.0/mlp/up_proj/MatMul"]}
    records = stages.parse_engine_information(SAMPLE.read_text())
    kernels = stages.kernel_evidence(records, ["prefill", "decode"], log)
    assert kernels["sparse_kernels"] == "used"
    assert kernels["evidence"].startswith("TensorRT engine inspector: 8 of 30 GEMM/conv layers ran sparse tactics: prefill: 8 of 15")
    assert "decode: 0 of 15" in kernels["evidence"] and "4 Myelin foreign node(s)" in kernels["evidence"]
    assert kernels["layers"] == records and kernels["build_log"] == log

    data = json.loads(SAMPLE.read_text())
    for layer in data["Layers"]:
        if "TacticName" in layer:
            layer["TacticName"] = layer["TacticName"].replace("_sparse", "").replace("sptensor16x8x32", "tensor16x8x16")
    dense_with_myelin = stages.parse_engine_information(json.dumps(data))
    assert stages.kernel_evidence(dense_with_myelin)["sparse_kernels"] == "unknown"  # hidden GEMMs may be sparse
    data["Layers"] = [layer for layer in data["Layers"] if layer["LayerType"] != "Myelin"]
    dense = stages.kernel_evidence(stages.parse_engine_information(json.dumps(data)), ["prefill", "decode"])
    assert dense["sparse_kernels"] == "not-used" and "0 of 30 GEMM/conv" in dense["evidence"]


def test_inspector_listing_myelin_kernels_and_one_set_of_layers_for_all_profiles():
    """TensorRT 10 with DETAILED verbosity lists a Myelin region as its inner kernels
    ("gemm" / "kgen" layers: a TacticName, no TacticValue, no HasSparseWeights; names
    mangled with "_myl" suffixes), and may list the layers once for every profile
    (hand-written from NVIDIA/TensorRT issue 4397's dump, not recorded)."""
    def kernel(name, kind, tactic):
        return {"Name": name, "LayerType": kind, "Inputs": [], "Outputs": [], "TacticName": tactic, "StreamId": 0,
                "Metadata": f"[ONNX Layer: {name.split('_myl')[0]}]"}

    layers = [kernel("/model/layers_0/mlp/up_proj/MatMul_myl0_7", "gemm",
                     "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"),
              kernel("/model/layers_0/mlp/down_proj/MatMul_myl0_9", "gemm",
                     "sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_execute_segment_k_off"),
              kernel("__myl_MulSiluCast_myl0_8", "kgen", "__myl_MulSiluCast_0x5b2e")]
    records = stages.parse_engine_information(json.dumps({"Layers": layers, "Bindings": []}))
    assert [r["gemm"] for r in records] == [True, True, False] and not any(r["opaque"] for r in records)
    assert [r["sparse_tactic"] for r in records] == [False, True, False]
    assert all(r["sparse_weights"] is None for r in records)
    kernels = stages.kernel_evidence(records, ["prefill", "decode"])
    assert kernels["sparse_kernels"] == "used"
    assert "all profiles (the inspector lists them as one): 1 of 2" in kernels["evidence"]
    assert "prefill" not in kernels["evidence"] and "decode" not in kernels["evidence"]


def test_inspector_without_detailed_verbosity_or_json():
    names_only = json.dumps({"Layers": ["/model/layers.0/mlp/up_proj/MatMul", "Reformatting CopyNode"], "Bindings": []})
    kernels = stages.kernel_evidence(stages.parse_engine_information(names_only))
    assert kernels["sparse_kernels"] == "unknown"
    with pytest.raises(BadInput, match="not JSON"):
        stages.parse_engine_information("Layers: none")


def test_timing_cache_lives_under_the_sparsedeploy_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEDEPLOY_CACHE", str(tmp_path / "cache"))
    path = stages.timing_cache_path("10.8.0", "NVIDIA H100 80GB HBM3", (9, 0))
    assert path == tmp_path / "cache" / "tensorrt" / "timing-10.8.0-nvidia-h100-80gb-hbm3-sm90.cache"
