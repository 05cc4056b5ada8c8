"""`build` and `check` through the real command line and the real ONNX Runtime, on a tiny
model pruned to 2:4 (and its dense source), with a small check workload."""

from __future__ import annotations

import errno
import json
import platform
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_json, save_tokenized_tiny, small_profile, tree_fingerprint

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {
    "schema", "target", "profile", "engine", "precision", "checkpoint", "artifact", "quality", "latency", "gates", "passed",
}
LATENCY_KEYS = {"prefill_tok_s", "decode_tok_s", "prefill_ms_p50", "prefill_ms_p95", "decode_ms_p50", "decode_ms_p95"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, default_checkpoint):
    """Targets folder, a private cache, a tiny dense checkpoint and its 2:4 pruning."""
    root = tmp_path_factory.mktemp("build")
    targets = root / "targets"
    targets.mkdir()
    (targets / "onnxruntime.toml").write_text(small_profile("onnxruntime"))
    # A CPU profile that, like tensorrt, accepts only 2:4 checkpoints.
    (targets / "cpu-2of4.toml").write_text(small_profile("onnxruntime", patterns=["2:4"], precisions=["fp32", "int8"]))
    # A gate no build can pass: the bundle is still written, the exit code is 1.
    impossible = small_profile("onnxruntime").replace("[gates]\n", "[gates]\nmin_prefill_speedup = 100.0\n", 1)
    assert "min_prefill_speedup = 100.0" in impossible
    (targets / "impossible.toml").write_text(impossible)
    shutil.copy(REPO / "targets" / "tensorrt.toml", targets / "tensorrt.toml")
    static = (small_profile("onnxruntime").replace('int8_scheme = "int8-dynamic"', 'int8_scheme = "int8-static-qdq"')
              .replace("calib_nsamples = 16", "calib_nsamples = 4").replace("calib_seqlen = 256", "calib_seqlen = 32"))
    assert 'int8_scheme = "int8-static-qdq"' in static and "calib_seqlen = 32" in static
    (targets / "ort-static.toml").write_text(static)
    env = {"SPARSEDEPLOY_TARGETS": str(targets), "SPARSEDEPLOY_CACHE": str(root / "cache")}

    dense = save_tokenized_tiny(root / "dense", default_checkpoint)
    pruned = root / "pruned-2of4"
    result = run_cli("prune", str(dense), "-o", str(pruned), "--method", "magnitude", "--pattern", "2:4", env=env)
    assert result.returncode == 0, result.stderr
    unstructured = root / "pruned-50"
    result = run_cli("prune", str(dense), "-o", str(unstructured), "--method", "magnitude", "--sparsity", "0.5", env=env)
    assert result.returncode == 0, result.stderr
    return {"root": root, "env": env, "dense": dense, "pruned": pruned, "unstructured": unstructured}


@pytest.fixture(scope="module")
def built(workspace):
    """One fp32 onnxruntime build of the 2:4 checkpoint; its report and stderr."""
    bundle = workspace["root"] / "bundle"
    before = tree_fingerprint(workspace["pruned"])
    result = run_cli("build", "--target", "onnxruntime", "--model", str(workspace["pruned"]), "-o", str(bundle), "--json",
                     env=workspace["env"])
    assert result.returncode == 0, result.stderr
    assert tree_fingerprint(workspace["pruned"]) == before, "build modified its input checkpoint"
    return {"bundle": bundle, "report": json.loads(result.stdout), "stderr": result.stderr}


def test_report_follows_the_contract_with_measured_numbers(built, workspace):
    report = built["report"]
    assert CONTRACT_KEYS <= set(report)
    assert report["schema"] == "sparsedeploy.report/1"
    assert report["engine"]["name"] == "onnxruntime" and report["engine"]["version"]
    assert report["precision"] == "fp32"
    assert report["checkpoint"]["pattern"] == "2:4"
    assert report["checkpoint"]["nm_compliance"]["2:4"] == 1.0
    # Measured in the exported graph, not copied from the checkpoint.
    artifact = report["artifact"]
    assert artifact["path"] == "artifact/model.onnx"
    assert artifact["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert artifact["nm_compliance"]["2:4"] == 1.0
    assert artifact["bytes"] == sum(p.stat().st_size for p in (built["bundle"] / "artifact").iterdir() if p.name != "artifact.json") + \
        (built["bundle"] / "artifact" / "artifact.json").stat().st_size
    quality = report["quality"]
    assert quality["protocol"]["windows"] == 2 and quality["protocol"]["seqlen"] == 64
    assert quality["protocol"]["tokens"] == 2 * 63
    assert quality["protocol"]["data"]["name"] == "wikitext2"
    # ONNX Runtime fp32 reproduces PyTorch: the same perplexity and next-token choices.
    assert quality["ppl_target"] == pytest.approx(quality["ppl_reference"], rel=1e-4)
    assert quality["kl_mean"] < 1e-6 and quality["top1_agreement"] == 1.0
    assert quality["ppl_dense"] != quality["ppl_target"]  # the dense source is a different model
    latency = report["latency"]
    assert latency["workload"] == {"prompt_tokens": 16, "new_tokens": 4, "batch": 1, "runs": 2, "warmup": 1,
                                   "threads": latency["workload"]["threads"]}
    for build in ("sparse", "dense"):
        assert LATENCY_KEYS <= set(latency[build])
        assert all(latency[build][key] > 0 for key in LATENCY_KEYS)
        assert latency[build]["prefill_ms_p95"] >= latency[build]["prefill_ms_p50"]
    assert latency["speedup"]["prefill"] == pytest.approx(latency["dense"]["prefill_ms_p50"] / latency["sparse"]["prefill_ms_p50"])
    # ONNX Runtime has no sparse kernels: the report says so whatever the timings show.
    assert latency["sparse_kernels"] == "not-used"
    assert "dense kernels" in latency["evidence"]
    assert {gate["name"] for gate in report["gates"]} == {"max_ppl_delta_pct", "max_kl_mean", "min_top1_agreement"}
    assert report["passed"] is True and all(gate["passed"] for gate in report["gates"])


def test_bundle_layout_and_manifest(built):
    bundle = built["bundle"]
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"report.json", "report.md", "latency.png", "manifest.json", "artifact/model.onnx", "baseline/model.onnx",
            "artifact/model.last.onnx", "baseline/model.last.onnx",
            "reference/model.safetensors", "reference/config.json", "reference/sparsity.json"} <= names
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {entry["path"] for entry in manifest["files"]}
    assert listed == names - {"manifest.json"}
    assert (bundle / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (bundle / "report.md").read_text()
    assert "## Gates" in markdown and "## Latency" in markdown and "latency.png" in markdown
    assert "Sparse kernels: **not-used**" in markdown
    assert not [p for p in bundle.parent.iterdir() if ".partial-" in p.name]


def test_second_identical_build_reuses_the_cache(built, workspace):
    bundle = workspace["root"] / "bundle-again"
    result = run_cli("build", "--target", "onnxruntime", "--model", str(workspace["pruned"]), "-o", str(bundle), "--json",
                     env=workspace["env"])
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert result.stderr.count("reused from the cache") == 2
    assert again["cached_measurements"]
    assert again["quality"] == built["report"]["quality"]
    assert again["artifact"]["sha256"] == built["report"]["artifact"]["sha256"]


def test_check_reproduces_the_bundle(built, workspace):
    report = run_cli_json("check", str(built["bundle"]), env=workspace["env"])
    assert report["reproduction"]["reproduced"] is True
    assert report["quality"]["ppl_target"] == pytest.approx(built["report"]["quality"]["ppl_target"], rel=1e-6)
    assert report["passed"] is True


@pytest.mark.parametrize("target, quant, scheme", [
    ("onnxruntime", "int8", "int8-dynamic"),
    ("ort-static", "int8", "int8-static-qdq"),
    ("onnxruntime", "int4", "int4-weight-only"),
])
def test_quantized_builds_keep_the_zeros_and_track_the_reference(workspace, target, quant, scheme):
    bundle = workspace["root"] / f"bundle-{target}-{quant}"
    report = run_cli_json("build", "--target", target, "--model", str(workspace["pruned"]), "--quant", quant,
                          "-o", str(bundle), env=workspace["env"])
    assert report["precision"] == quant
    quantization = report["artifact"]["details"]["quantization"]
    assert quantization["scheme"] == scheme
    if quant == "int8":  # per-tensor activations: SmoothQuant first (the two norms of each layer)
        assert quantization["smoothing"]["alpha"] == 0.5 and quantization["smoothing"]["groups_smoothed"] == 4
    if quant == "int4":  # GPTQ first: every quantized weight reaches the packer on its grid
        assert quantization["gptq"]["linears"] == 14 and quantization["gptq"]["block_size"] == 32
        assert quantization["settings"]["weights_on_given_grid"] == quantization["settings"]["quantized_nodes"] == 14
    # Symmetric weight quantization maps 0.0 to the zero point: the pattern survives.
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    assert 0.5 <= report["artifact"]["sparsity"] < 0.52
    quality = report["quality"]
    assert quality["top1_agreement"] >= 0.95 and quality["kl_mean"] < 0.01
    assert quality["ppl_target"] != quality["ppl_reference"]  # really quantized
    assert report["latency"]["sparse_kernels"] == "not-used"


def test_static_int8_refuses_calibration_that_overlaps_the_evaluation_text(workspace):
    profile = workspace["root"] / "targets" / "ort-static.toml"
    overlapping = workspace["root"] / "targets-overlap"
    overlapping.mkdir(exist_ok=True)
    (overlapping / "ort-static.toml").write_text(profile.read_text().replace('calib = "canterbury"', 'calib = "wikitext2"'))
    result = run_cli("build", "--target", "ort-static", "--model", str(workspace["pruned"]), "--quant", "int8", "-o",
                     str(workspace["root"] / "overlap"), env={**workspace["env"], "SPARSEDEPLOY_TARGETS": str(overlapping)})
    assert result.returncode == 2
    assert "overlaps evaluation text" in result.stderr
    assert not (workspace["root"] / "overlap").exists()


def test_calib_option_names_the_text_and_its_content_keys_the_cache(built, workspace):
    """`--calib file:PATH` calibrates on the user's own text; the report names it with its
    sha256, and editing the file (same name) builds anew instead of reusing the cache."""
    import hashlib

    from sparsedeploy.data.sources import TEXTS_DIR

    book = (TEXTS_DIR / "canterbury" / "alice29.txt").read_text(encoding="utf-8")
    text = workspace["root"] / "my-domain.txt"
    env, model = workspace["env"], str(workspace["pruned"])

    def build_with(content: str, name: str):
        text.write_text(content, encoding="utf-8")
        return run_cli("build", "--target", "ort-static", "--model", model, "--quant", "int8", "--calib", f"file:{text}",
                       "-o", str(workspace["root"] / name), "--json", env=env)

    first = build_with(book[:40_000], "calib-a")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["artifact"]["calibration"] == {
        "name": f"file:{text}", "sha256": hashlib.sha256(book[:40_000].encode()).hexdigest(),
        "nsamples": 4, "seqlen": 32, "seed": 0}
    assert report["profile"]["build"]["calib"] == f"file:{text}"
    assert f"Calibrated on `file:{text}`" in (workspace["root"] / "calib-a" / "report.md").read_text()
    again = build_with(book[:40_000], "calib-a-again")
    assert again.returncode == 0 and again.stderr.count("reused from the cache") == 2, again.stderr
    edited = build_with(book[40_000:80_000], "calib-b")
    assert edited.returncode == 0, edited.stderr
    assert "reused from the cache" not in edited.stderr
    assert json.loads(edited.stdout)["artifact"]["sha256"] != report["artifact"]["sha256"]

    # A float build reads no calibration text: it says so and goes on.
    unused = run_cli("build", "--target", "onnxruntime", "--model", model, "--calib", "canterbury-books",
                     "-o", str(workspace["root"] / "calib-fp32"), env=env)
    assert unused.returncode == 0, unused.stderr
    assert "--calib canterbury-books is not used: this fp32 build" in unused.stderr
    # An unknown source fails before anything is built, with one error line.
    bad = run_cli("build", "--target", "ort-static", "--model", model, "--quant", "int8", "--calib", "my-text",
                  "-o", str(workspace["root"] / "calib-bad"), env=env)
    assert bad.returncode == 2, bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown data source 'my-text'" in errors[0], bad.stderr
    assert "[2/5]" not in bad.stderr and not (workspace["root"] / "calib-bad").exists()


def test_deepsparse_build_and_check_through_the_pipeline(workspace):
    from sparsedeploy.backends.deepsparse_cpu import DeepSparseBackend

    availability = DeepSparseBackend().availability()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(availability.reason)  # DeepSparse is x86-64 only
    assert availability.available, f"`make install` sets DeepSparse up on x86-64: {availability.reason}"
    targets = workspace["root"] / "targets-ds"
    targets.mkdir(exist_ok=True)
    # The tiny model's speed ratio is noise: this test is about the pipeline, not the gate.
    profile = small_profile("deepsparse").replace("min_prefill_speedup = 1.0", "")
    (targets / "deepsparse.toml").write_text(profile)
    env = {**workspace["env"], "SPARSEDEPLOY_TARGETS": str(targets)}
    bundle = workspace["root"] / "bundle-deepsparse"
    report = run_cli_json("build", "--target", "deepsparse", "--model", str(workspace["pruned"]), "-o", str(bundle), env=env)
    assert report["engine"]["name"] == "deepsparse" and report["engine"]["version"].startswith("1.8")
    assert report["artifact"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    quality = report["quality"]
    assert quality["ppl_target"] == pytest.approx(quality["ppl_reference"], rel=1e-3)
    assert quality["top1_agreement"] >= 0.99
    assert report["latency"]["sparse_kernels"] in ("used", "not-used", "unknown")
    assert report["latency"]["engine_kernels"]["evidence"]
    again = run_cli_json("check", str(bundle), env=env)
    assert again["reproduction"]["reproduced"] is True


def test_check_names_a_tampered_file(built, workspace):
    copy = workspace["root"] / "tampered"
    shutil.copytree(built["bundle"], copy)
    weights = copy / "baseline" / "model.onnx.data"
    weights.chmod(0o644)  # cache files are read-only, and copytree keeps modes
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    weights.write_bytes(bytes(data))
    result = run_cli("check", str(copy), env=workspace["env"])
    assert result.returncode == 2
    assert "baseline/model.onnx.data" in result.stderr and "sha256" in result.stderr
    config = copy / "reference" / "config.json"
    shutil.copy(built["bundle"] / "baseline" / "model.onnx.data", weights)
    config.write_text(config.read_text() + " ")
    result = run_cli("check", str(copy), env=workspace["env"])
    assert result.returncode == 2 and "reference/config.json" in result.stderr


def test_check_refuses_a_file_added_or_removed(built, workspace):
    copy = workspace["root"] / "extra"
    shutil.copytree(built["bundle"], copy)
    (copy / "artifact" / "notes.txt").write_text("hello")
    result = run_cli("check", str(copy), env=workspace["env"])
    assert result.returncode == 2 and "artifact/notes.txt" in result.stderr
    (copy / "artifact" / "notes.txt").unlink()
    (copy / "report.md").unlink()
    result = run_cli("check", str(copy), env=workspace["env"])
    assert result.returncode == 2 and "report.md" in result.stderr and "missing" in result.stderr


def test_existing_output_is_refused_without_force(built, workspace):
    before = tree_fingerprint(built["bundle"])
    result = run_cli("build", "--target", "onnxruntime", "--model", str(workspace["pruned"]), "-o", str(built["bundle"]),
                     env=workspace["env"])
    assert result.returncode == 2 and "--force" in result.stderr
    assert tree_fingerprint(built["bundle"]) == before


def test_non_2of4_checkpoint_to_a_2of4_target_names_the_prune_command(workspace):
    output = workspace["root"] / "refused"
    result = run_cli("build", "--target", "cpu-2of4", "--model", str(workspace["unstructured"]), "-o", str(output),
                     env=workspace["env"])
    assert result.returncode == 2
    assert "unstructured" in result.stderr and "sparsedeploy prune" in result.stderr and "--pattern 2:4" in result.stderr
    assert not output.exists()


def test_missing_engine_exits_3(workspace):
    result = run_cli("build", "--target", "tensorrt", "--model", str(workspace["pruned"]), "-o",
                     str(workspace["root"] / "trt"), env=workspace["env"])
    assert result.returncode == 3
    assert "tensorrt" in result.stderr.lower()


def test_unsupported_precision_is_bad_input(workspace):
    result = run_cli("build", "--target", "cpu-2of4", "--model", str(workspace["pruned"]), "--quant", "int4", "-o",
                     str(workspace["root"] / "int4"), env=workspace["env"])
    assert result.returncode == 2
    assert "int4" in result.stderr and "--target onnxruntime" in result.stderr


def test_failed_gate_exits_1_and_keeps_the_bundle(workspace):
    bundle = workspace["root"] / "impossible"
    result = run_cli("build", "--target", "impossible", "--model", str(workspace["pruned"]), "-o", str(bundle), "--json",
                     env=workspace["env"])
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is False
    failed = [gate for gate in report["gates"] if not gate["passed"]]
    assert [gate["name"] for gate in failed] == ["min_prefill_speedup"]
    assert "min_prefill_speedup" in result.stderr
    assert json.loads((bundle / "report.json").read_text())["passed"] is False


def _request(workspace, name: str, **changes):
    from sparsedeploy.build.pipeline import BuildRequest

    return BuildRequest("onnxruntime", str(workspace["pruned"]), output=workspace["root"] / name, fresh=True, **changes)


def test_interrupt_during_the_check_leaves_nothing_half_written(workspace, monkeypatch):
    from sparsedeploy.build import pipeline
    from sparsedeploy.errors import Interrupted

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)

    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted")

    monkeypatch.setattr(pipeline, "latency_side_by_side", interrupted)
    with pytest.raises(Interrupted):
        pipeline.build(_request(workspace, "interrupted"))
    assert not (workspace["root"] / "interrupted").exists()
    assert not [p for p in workspace["root"].iterdir() if p.name.startswith(".interrupted")]


def test_interrupt_during_an_artifact_build_leaves_no_cache_entry(workspace, monkeypatch, tmp_path):
    from sparsedeploy.build import pipeline
    from sparsedeploy.backends.onnxruntime_cpu import OnnxRuntimeBackend
    from sparsedeploy.errors import Interrupted

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPARSEDEPLOY_CACHE", str(tmp_path / "cache"))
    real_build = OnnxRuntimeBackend.build

    def build_then_interrupt(self, inputs, output_dir):
        real_build(self, inputs, output_dir)
        raise Interrupted("interrupted")

    monkeypatch.setattr(OnnxRuntimeBackend, "build", build_then_interrupt)
    with pytest.raises(Interrupted):
        pipeline.build(_request(workspace, "interrupted-build"))
    artifacts = tmp_path / "cache" / "artifacts"
    assert not [p for p in artifacts.iterdir() if p.is_dir()], "an interrupted build left a cache entry"
    assert not (workspace["root"] / "interrupted-build").exists()


def test_full_disk_is_a_clear_error_and_no_bundle(workspace, monkeypatch):
    from sparsedeploy.build import bundle as bundles
    from sparsedeploy.build import pipeline
    from sparsedeploy.errors import SparsedeployError

    for key, value in workspace["env"].items():
        monkeypatch.setenv(key, value)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundles.shutil, "copyfile", no_space)
    with pytest.raises(SparsedeployError, match="no space left") as raised:
        pipeline.build(_request(workspace, "full-disk"))
    assert raised.value.exit_code == 2
    assert not (workspace["root"] / "full-disk").exists()
    assert not [p for p in workspace["root"].iterdir() if p.name.startswith(".full-disk")]


@pytest.mark.default_model
def test_default_model_builds_for_onnxruntime_end_to_end(tmp_path):
    """The real default model, pruned to 2:4, through the real onnxruntime profile (fewer
    windows and runs than the profile, for time); artifacts in a private build cache."""
    env = {"SPARSEDEPLOY_BUILD_CACHE": str(tmp_path / "build-cache")}
    pruned = tmp_path / "default-2of4"
    result = run_cli("prune", "default", "-o", str(pruned), "--method", "magnitude", "--pattern", "2:4", env=env)
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "bundle"
    result = run_cli("build", "--target", "onnxruntime", "--model", str(pruned), "-o", str(bundle), "--windows", "2",
                     "--runs", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert CONTRACT_KEYS <= set(report) and report["passed"] is True
    assert report["checkpoint"]["dense_source"]["path"] == "default"
    assert report["artifact"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    quality = report["quality"]
    assert quality["protocol"]["tokens"] == 2 * 1023
    assert quality["ppl_target"] == pytest.approx(quality["ppl_reference"], rel=1e-3)
    assert quality["top1_agreement"] >= 0.99 and quality["kl_mean"] < 1e-3
    assert quality["ppl_dense"] < quality["ppl_target"]  # magnitude 2:4 costs quality
    assert report["latency"]["sparse_kernels"] == "not-used"
    assert report["artifact"]["bytes"] > 100 * 2**20


def test_build_all_builds_what_can_run_and_says_what_cannot(workspace):
    targets = workspace["root"] / "targets-all"
    targets.mkdir(exist_ok=True)
    shutil.copy(workspace["root"] / "targets" / "onnxruntime.toml", targets / "onnxruntime.toml")
    shutil.copy(REPO / "targets" / "tensorrt.toml", targets / "tensorrt.toml")
    out = workspace["root"] / "all"
    # --gguf-type goes to llama.cpp targets only; the others build as if it were not given
    result = run_cli("build", "--all", "--model", str(workspace["pruned"]), "-o", str(out), "--json", "--gguf-type", "Q8_0",
                     env={**workspace["env"], "SPARSEDEPLOY_TARGETS": str(targets)})
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [report["target"] for report in reports] == ["onnxruntime"]
    assert (out / "onnxruntime" / "manifest.json").is_file()
    assert "skipping targets that cannot run here: tensorrt" in result.stderr


@pytest.mark.parametrize("prefill, decode, expected", [
    (1.27, 0.94, "Sparse kernels ran: prefill 1.27x (faster), decode 0.94x (slower) against the dense build."),
    (1.01, 0.90, "Sparse kernels ran but gained nothing over the dense build: prefill 1.01x (no faster), decode 0.90x (slower)."),
])
def test_verdict_says_plainly_when_sparse_kernels_ran_but_a_phase_got_slower(prefill, decode, expected):
    from sparsedeploy.build.report import verdict

    report = {"latency": {"speedup": {"prefill": prefill, "decode": decode}, "sparse_kernels": "used", "evidence": "x"}}
    assert verdict(report) == expected


def test_a_recovered_checkpoint_builds_like_any_other(workspace):
    """prune -> recover -> build: the recovered checkpoint's sparsity.json (re-measured
    layers, the recovery record) passes the pipeline's verification, and the dense
    source it names is still the baseline."""
    recovered = workspace["root"] / "recovered-2of4"
    result = run_cli("recover", str(workspace["pruned"]), "-o", str(recovered), "--steps", "2", "--eval-every", "2",
                     "--seqlen", "32", "--heldout-windows", "2", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    report = run_cli_json("build", "--target", "cpu-2of4", "--model", str(recovered), "-o",
                          str(workspace["root"] / "bundle-recovered"), env=workspace["env"])
    assert report["checkpoint"]["pattern"] == "2:4" and report["checkpoint"]["nm_compliance"]["2:4"] == 1.0
    assert report["checkpoint"]["dense_source"]["path"] == str(workspace["dense"])
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    assert report["quality"]["kl_mean"] < 1e-6 and report["passed"] is True
