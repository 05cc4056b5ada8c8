"""The gguf target through the real llama.cpp converter, quantizer and runtime (built by
`make install`), on tiny models with the default tokenizer and once on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model, run_cli, run_cli_json, save_checkpoint, save_tokenized_tiny, small_profile

WINDOW = torch.tensor([1, 504, 2743, 282, 260, 3070, 30, 2115, 1615, 314, 1345, 28, 11126, 327, 42, 9160] * 2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, default_checkpoint):
    """A small gguf profile, a private cache, a tiny dense Llama and its 2:4, depth- and
    width-pruned versions."""
    root = tmp_path_factory.mktemp("gguf")
    targets = root / "targets"
    targets.mkdir()
    (targets / "gguf.toml").write_text(small_profile("gguf"))
    env = {"SPARSEDEPLOY_TARGETS": str(targets), "SPARSEDEPLOY_CACHE": str(root / "cache"),
           "SPARSEDEPLOY_BUILD_CACHE": str(root / "build-cache")}
    dense = save_tokenized_tiny(root / "dense", default_checkpoint, num_hidden_layers=3)
    pruned = {}
    for label, args in (("2of4", ["--method", "magnitude", "--pattern", "2:4"]),
                        ("depth", ["--structured", "depth", "--drop", "1"]),
                        ("width", ["--structured", "width", "--heads", "0.5", "--ffn", "0.25"])):
        pruned[label] = root / label
        result = run_cli("prune", str(dense), "-o", str(pruned[label]), *args, "--nsamples", "4", "--seqlen", "32", env=env)
        assert result.returncode == 0, result.stderr
    return {"root": root, "env": env, "dense": dense, **pruned}


def convert_and_quantize(checkpoint: Path, directory: Path, gguf_type: str) -> Path:
    from sparsedeploy.export.gguf import convert_checkpoint, quantize

    directory.mkdir(parents=True, exist_ok=True)
    converted = directory / "f32.gguf"
    if not converted.exists():
        convert_checkpoint(checkpoint, converted)
    output = directory / f"{gguf_type}.gguf"
    quantize(converted, output, gguf_type, threads=2)
    return output


def session_for(path: Path, seqlen: int = 64):
    from sparsedeploy.backends.base import Workload
    from sparsedeploy.backends.llamacpp import LlamaCppSession

    workload = Workload(eval_seqlen=seqlen, eval_windows=1, prompt_tokens=16, new_tokens=4, batches=(1,), runs=1, warmup=0, threads=2)
    return LlamaCppSession(path, workload, {})


# -- convert, quantize, measure -------------------------------------------------------


def test_llamacpp_logits_of_an_f32_conversion_match_pytorch(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = convert_and_quantize(workspace["dense"], tmp_path, "F32")
    model = AutoModelForCausalLM.from_pretrained(workspace["dense"]).eval()
    with torch.no_grad():
        expected = model(WINDOW[None]).logits[0]
    with session_for(gguf) as session:
        got = session.logits(WINDOW)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_q8_0_keeps_2of4_zeros_exact_and_the_file_is_measured(workspace, tmp_path):
    from sparsedeploy.export.gguf import read_contents

    recorded = json.loads((workspace["2of4"] / "sparsity.json").read_text())["measured"]["total_sparsity"]
    f32 = read_contents(convert_and_quantize(workspace["2of4"], tmp_path, "F32"), "F32")
    # The converter writes the checkpoint's values: the same zeros, the same 2:4 groups.
    assert f32.sparsity["sparsity"] == pytest.approx(recorded, abs=1e-6)
    assert f32.sparsity["compliance"]["2:4"] == 1.0
    assert f32.sparsity["num_linear_weights"] == 3 * 7
    q8 = read_contents(convert_and_quantize(workspace["2of4"], tmp_path, "Q8_0"), "Q8_0")
    # Q8_0 is symmetric: a zero stays an exact zero; small weights may round to zero too.
    assert q8.sparsity["compliance"]["2:4"] == 1.0
    assert q8.sparsity["sparsity"] >= recorded
    assert set(q8.tensor_types["counts"]) >= {"Q8_0", "F32"}
    assert q8.tensor_types["fallbacks"] == []
    assert q8.shapes["block_count"] == 3 and q8.shapes["embedding_length"] == 64


def test_k_quants_report_which_tensors_fell_back(workspace, tmp_path):
    from sparsedeploy.export.gguf import read_contents

    contents = read_contents(convert_and_quantize(workspace["dense"], tmp_path, "Q4_K_M"), "Q4_K_M")
    # Rows of 64 or 128 values cannot hold a 256-value K-quant block: llama.cpp stores those
    # tensors in another type, and the report names it.
    fallbacks = contents.tensor_types["fallbacks"]
    assert fallbacks, contents.tensor_types
    assert all(entry["row_length"] % 256 != 0 and entry["type"] != "Q4_K" for entry in fallbacks)
    assert sum(entry["tensors"] for entry in fallbacks) >= 3 * 7
    entry_types = {weight["type"] for weight in contents.sparsity["linear_weights"]}
    assert entry_types <= set(contents.tensor_types["counts"])


def test_unknown_gguf_type_names_the_known_ones():
    from sparsedeploy.errors import BadInput
    from sparsedeploy.export.gguf import normalize_gguf_type, precision_of

    assert normalize_gguf_type("q4_k_m") == "Q4_K_M"
    assert precision_of("Q8_0") == "int8" and precision_of("Q5_K_M") == "int4" and precision_of("F16") == "fp16"
    with pytest.raises(BadInput, match="unknown GGUF type 'Q9_9'.*Q4_K_M"):
        normalize_gguf_type("Q9_9")


# -- the command line ---------------------------------------------------------------


def test_build_gguf_end_to_end_and_check_reproduces(workspace):
    bundle = workspace["root"] / "bundle-2of4"
    result = run_cli("build", "--target", "gguf", "--model", str(workspace["2of4"]), "--quant", "int8", "-o", str(bundle),
                     "--json", env=workspace["env"])
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["engine"]["name"] == "llama.cpp" and report["precision"] == "int8"
    assert (bundle / "artifact" / "model.gguf").is_file() and (bundle / "baseline" / "model.gguf").is_file()
    details = report["artifact"]["details"]
    assert details["gguf_type"] == "Q8_0" and details["quantization"]["type"] == "Q8_0"
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    assert report["latency"]["sparse_kernels"] == "not-used"
    assert "llama.cpp has no sparse kernels" in report["latency"]["evidence"]
    quality = report["quality"]
    assert quality["ppl_target"] == pytest.approx(quality["ppl_reference"], rel=0.05)
    assert quality["top1_agreement"] > 0.8
    for phase in ("sparse", "dense"):
        assert report["latency"][phase]["prefill_tok_s"] > 0 and report["latency"][phase]["decode_tok_s"] > 0
    checked = run_cli_json("check", str(bundle), env=workspace["env"]) if result.returncode == 0 else None
    if checked is not None:
        assert checked["reproduction"]["reproduced"], checked["reproduction"]


@pytest.mark.parametrize("label", ["depth", "width"])
def test_structured_checkpoints_convert_and_run(workspace, label):
    report = run_cli("build", "--target", "gguf", "--model", str(workspace[label]), "--quant", "int8", "-o",
                     str(workspace["root"] / f"bundle-{label}"), "--json", env=workspace["env"])
    assert report.returncode in (0, 1), report.stderr
    report = json.loads(report.stdout)
    shapes = report["latency"]["engine_kernels"]["shapes"]
    if label == "depth":
        assert shapes["block_count"] == 2
    else:
        assert shapes["head_count"] == 2 and shapes["head_count_kv"] == 1 and shapes["feed_forward_length"] == 96
    assert report["quality"]["top1_agreement"] > 0.8
    assert "structured pruning" in report["latency"]["evidence"]


def test_gguf_type_flag_sets_the_type_and_its_precision(workspace):
    report = run_cli_json("build", "--target", "gguf", "--model", str(workspace["dense"]), "--gguf-type", "q5_0",
                          "-o", str(workspace["root"] / "bundle-q5"), env=workspace["env"])
    assert report["artifact"]["details"]["gguf_type"] == "Q5_0" and report["precision"] == "int4"


@pytest.mark.parametrize("args, message", [
    (["--target", "gguf", "--gguf-type", "Q9_9"], "unknown GGUF type 'Q9_9'"),
    (["--target", "onnxruntime", "--gguf-type", "Q8_0"], "--gguf-type is for the gguf target"),
])
def test_bad_gguf_flags_exit_2(workspace, args, message):
    result = run_cli("build", *args, "--model", str(workspace["dense"]), "-o", str(workspace["root"] / "never"),
                     env={**workspace["env"], "SPARSEDEPLOY_TARGETS": str(Path(__file__).resolve().parents[1] / "targets")})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (workspace["root"] / "never").exists()


def test_an_architecture_llamacpp_does_not_know_exits_2(workspace, tmp_path):
    opt = save_checkpoint(make_tiny_model("opt"), tmp_path / "tiny-opt")
    result = run_cli("build", "--target", "gguf", "--model", str(opt), "-o", str(tmp_path / "out"), env=workspace["env"])
    assert result.returncode == 2, result.stderr
    assert "does not know OPTForCausalLM" in result.stderr
    assert not (tmp_path / "out").exists()


def test_layers_of_different_shapes_exit_2_naming_the_tensor(workspace, tmp_path):
    from safetensors.numpy import load_file, save_file

    import shutil

    uneven = shutil.copytree(workspace["dense"], tmp_path / "uneven")
    tensors = load_file(str(uneven / "model.safetensors"))
    for name in ("gate_proj", "up_proj"):
        key = f"model.layers.1.mlp.{name}.weight"
        tensors[key] = np.ascontiguousarray(tensors[key][:64])
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = np.ascontiguousarray(tensors[key][:, :64])
    save_file(tensors, str(uneven / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli("build", "--target", "gguf", "--model", str(uneven), "-o", str(tmp_path / "out"), env=workspace["env"])
    assert result.returncode == 2, result.stderr
    assert "different shapes (model.layers.1.mlp." in result.stderr and "same shapes in every layer" in result.stderr


# -- the default model --------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_q4_k_m_build(tmp_path):
    """`build --target gguf --model default --quant int4` on a shortened workload: the
    576-wide rows fall back from Q4_K, and the report says to which type."""
    env = {"SPARSEDEPLOY_BUILD_CACHE": str(tmp_path / "cache")}
    result = run_cli("build", "--target", "gguf", "--model", "default", "--quant", "int4", "--windows", "2", "--runs", "1",
                     "-o", str(tmp_path / "bundle"), "--json", env=env)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    details = report["artifact"]["details"]
    assert details["gguf_type"] == "Q4_K_M"
    assert any(entry["row_length"] == 576 for entry in details["tensor_types"]["fallbacks"])
    quality = report["quality"]
    assert quality["ppl_target"] == pytest.approx(quality["ppl_reference"], rel=0.25)
    assert quality["top1_agreement"] > 0.7
    assert report["checkpoint"]["path"] == "default" and report["latency"]["speedup"]["decode"] > 0
