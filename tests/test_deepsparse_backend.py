"""The DeepSparse backend with the real engine (its own venv, through the worker) on
tiny random Llama models: build, logits and the KV-cache path against PyTorch, timing,
sparsity measured in the artifact, int8, the kernel report, and failures that must come
back as clean errors instead of hangs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import signal
import time

import pytest
import torch

from conftest import make_tiny_model
from sparsedeploy.backends.base import BuildInputs, BuiltArtifact, Workload
from sparsedeploy.backends.deepsparse_cpu import DeepSparseBackend, WorkerError, kernel_claim, kv_update
from sparsedeploy.errors import BadInput, SparsedeployError
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.patterns import nm_compliance, parse_nm

BACKEND = DeepSparseBackend()
AVAILABLE = BACKEND.availability()
# Skipped only where DeepSparse cannot exist (it is x86-64 only); on x86-64 `make install`
# creates its venv, so an unusable one is a broken install and fails here.
ON_X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not ON_X86, reason=f"DeepSparse cannot run here: {AVAILABLE.reason}")


@pytest.fixture(autouse=True)
def deepsparse_installed():
    assert AVAILABLE.available, f"DeepSparse is not usable on this x86-64 machine: {AVAILABLE.reason}"

WORKLOAD = Workload(eval_seqlen=48, eval_windows=1, prompt_tokens=12, new_tokens=5, batches=(1, 2), runs=3, warmup=1, threads=1)
VOCAB = 256  # conftest's tiny models
# fp32 engine vs PyTorch: measured ~4e-7 on logits of magnitude ~0.6 (different kernels
# and summation order only); 1e-4 leaves room for other CPUs' instruction sets.
FP32_ATOL = 1e-4
# int8 (static per-tensor QLinearMatMul): measured 100% top-1 agreement on these windows.
INT8_MIN_TOP1 = 0.9


def calibration():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(5))


def build(model, directory, precision="fp32"):
    directory.mkdir()
    artifact = BACKEND.build(BuildInputs(model, "test", precision, WORKLOAD, {}, calibration), directory)
    artifact.save_record()
    return BuiltArtifact.from_directory(directory)  # as the pipeline reads it back


def prune_2_4(model):
    """Keep the 2 largest |w| of every 4 along each decoder linear's input dimension."""
    with torch.no_grad():
        for linear in adapter_for(model).linear_sublayers():
            weight = linear.module.weight
            groups = weight.data.view(weight.shape[0], -1, 4)
            groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
            assert nm_compliance(weight, parse_nm("2:4")) == 1.0
    return model


def window(length, seed):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    model = make_tiny_model("llama")
    artifact = build(model, tmp_path_factory.mktemp("ds") / "dense")
    return model, artifact


@pytest.fixture(scope="module")
def dense_session(dense):
    with BACKEND.load(dense[1], WORKLOAD) as session:
        yield session


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    model = prune_2_4(make_tiny_model("llama", seed=1))
    artifact = build(model, tmp_path_factory.mktemp("ds") / "sparse")
    return model, artifact


def test_fp32_artifact_layout(dense):
    _, artifact = dense
    files = sorted(p.name for p in artifact.directory.iterdir())
    assert files == ["artifact.json", "model.last.onnx", "model.onnx", "model.onnx.data"]  # no scratch left behind
    assert artifact.main_file == "model.onnx" and artifact.precision == "fp32"
    assert artifact.details["exporter"]["opset"] == 17 and artifact.details["exporter"]["ir_version"] <= 9
    assert artifact.details["last_graph"]["slice_at"] == "lm_head input"
    assert artifact.sparsity["num_linear_weights"] == 14 and artifact.sparsity["sparsity"] == 0.0
    assert "linear_weights" not in artifact.sparsity  # the summary, not 14 per-weight entries
    assert BACKEND.engine_version() == "1.8.0"
    settings = BACKEND.build_settings("fp32", WORKLOAD, {"calib": "canterbury"})
    assert json.loads(json.dumps(settings)) == settings
    assert BACKEND.build_settings("int8", WORKLOAD, {})["quantizer"] == "int8-static-qoperator"
    assert BACKEND.build_settings("int8", WORKLOAD, {})["smoothquant_alpha"] == 0.5
    assert BACKEND.build_settings("int8", WORKLOAD, {"smoothquant_alpha": False})["smoothquant_alpha"] is None


def test_logits_match_pytorch(dense, dense_session):
    model, _ = dense
    for length, seed in ((48, 0), (17, 1)):  # the second window compiles a second engine
        tokens = window(length, seed)
        logits = dense_session.logits(tokens)
        with torch.no_grad():
            expected = model(tokens[None]).logits[0]
        assert logits.shape == (length, VOCAB) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("kv_update", ["in-place", "shift"])
def test_prefill_and_decode_through_the_fixed_context_cache_match_pytorch(dense, dense_session, kv_update):
    """The timed path: prefill with one masked past slot, then decode steps that write
    each new key/value into a masked slot ("in-place", Llama's default) or slide the
    whole cache by one slot ("shift", for sliding-window models); teacher-forced, batch 2."""
    model, artifact = dense
    assert artifact.details["geometry"]["kv_update"] == "in-place"
    prompt = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    continuation = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    if kv_update == "in-place":
        logits = dense_session.sequence_logits(prompt, continuation)
    else:
        details = copy.deepcopy(artifact.details)
        details["geometry"]["kv_update"] = "shift"
        with BACKEND.load(dataclasses.replace(artifact, details=details), WORKLOAD) as session:
            logits = session.sequence_logits(prompt, continuation)
    with torch.no_grad():
        expected = model(torch.cat([prompt, continuation], 1)).logits[:, 11:]
    assert logits.shape == (2, 6, VOCAB)
    torch.testing.assert_close(logits, expected, atol=FP32_ATOL, rtol=0)


def test_sliding_window_models_keep_slots_in_time_order():
    assert kv_update(make_tiny_model("mistral").config) == "shift"
    assert kv_update(make_tiny_model("gemma3_text").config) == "shift"
    assert kv_update(make_tiny_model("qwen2").config) == "in-place"  # sliding window configured but off


def test_measure_latency_counts(dense_session):
    for batch in (1, 2):
        samples = dense_session.measure_latency(batch, 12, 5, runs=3, warmup=1)
        assert len(samples.prefill_ms) == 3 and len(samples.decode_ms) == 3
        assert all(v > 0 for v in samples.prefill_ms + samples.decode_ms)
    one = dense_session.measure_latency(1, 12, 5, runs=1, warmup=0)  # how the pipeline alternates
    assert len(one.prefill_ms) == len(one.decode_ms) == 1


def test_dense_build_does_not_claim_sparse_kernels(dense_session):
    claim = dense_session.kernels()
    assert claim["sparse_kernels"] in ("not-used", "unknown")
    assert "DeepSparse's layer analysis" in claim["evidence"]
    assert set(claim["phases"]) == {"decode", "prefill"}
    assert all(0 < f <= 1 for f in claim["fraction_of_supported_ops"].values())


def test_2_4_artifact_sparsity_and_sparse_kernels(sparse):
    model, artifact = sparse
    assert artifact.sparsity["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert artifact.sparsity["compliance"]["2:4"] == 1.0
    with BACKEND.load(artifact, WORKLOAD) as session:
        tokens = window(48, 4)
        with torch.no_grad():
            expected = model(tokens[None]).logits[0]
        torch.testing.assert_close(session.logits(tokens), expected, atol=FP32_ATOL, rtol=0)
        session.measure_latency(1, 12, 5, runs=1, warmup=0)
        claim = session.kernels()
    # DeepSparse names its sparse kernels (ks_gevm / ks_gemm, kernel sparsity 0.5).
    assert claim["sparse_kernels"] == "used", claim["evidence"]
    assert claim["phases"]["decode"]["sparse_kernel_layers"] > 0
    assert "kernel sparsity 0.50" in claim["evidence"]


def test_int8_static_qoperator(sparse, tmp_path):
    model, _ = sparse
    artifact = build(model, tmp_path / "int8", "int8")
    assert artifact.precision == "int8" and artifact.details["quantizer"]["scheme"] == "int8-static-qoperator"
    assert artifact.details["quantizer"]["smoothing"]["groups_smoothed"] == 4  # per-tensor activations: SmoothQuant first
    # Measured in the quantized graph: pruned zeros stay zero (int8 zero point 0).
    assert artifact.sparsity["sparsity"] >= 0.5 and artifact.sparsity["compliance"]["2:4"] == 1.0
    tokens = window(64, 6)
    with torch.no_grad():
        expected = model(tokens[None]).logits[0]
    with BACKEND.load(artifact, WORKLOAD) as session:
        logits = session.logits(tokens)
        prompt, continuation = tokens[None, :12], tokens[None, 12:16]
        sequence = session.sequence_logits(prompt, continuation)
    agreement = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= INT8_MIN_TOP1
    # The decode path gives the same int8 numbers as the one-shot window.
    torch.testing.assert_close(sequence[0], logits[11:16], atol=1e-3, rtol=0)


def test_int4_and_other_precisions_are_bad_input(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(BadInput, match="--target onnxruntime"):
        BACKEND.build(BuildInputs(model, "test", "int4", WORKLOAD, {}), tmp_path)
    with pytest.raises(BadInput, match="fp32, int8"):
        BACKEND.build(BuildInputs(model, "test", "fp16", WORKLOAD, {}), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_killed_worker_is_a_clean_error(dense):
    _, artifact = dense
    session = BACKEND.load(artifact, WORKLOAD)
    os.kill(session.worker_pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match="SIGKILL"):
        session.logits(window(8, 0))
    assert time.monotonic() - started < 30
    with pytest.raises(WorkerError, match="gone"):  # and stays a clean error
        session.measure_latency(1, 12, 5, 1, 0)
    session.close()


def test_silent_worker_times_out_and_is_killed(dense):
    _, artifact = dense
    session = BACKEND.load(artifact, WORKLOAD)
    session._worker.idle_timeout_s = 2.0
    process = session._worker.process
    os.kill(session.worker_pid, signal.SIGSTOP)  # a hung engine
    try:
        with pytest.raises(WorkerError, match="did not answer for 2 s"):
            session.logits(window(8, 0))
        assert process.poll() is not None  # killed, not left behind
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        session.close()


def test_corrupt_model_file_is_a_clean_error(dense, tmp_path):
    _, artifact = dense
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in artifact.directory.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # truncated weights
    with BACKEND.load(BuiltArtifact.from_directory(broken), WORKLOAD) as session:
        with pytest.raises(SparsedeployError) as caught:
            session.logits(window(8, 0))
    assert "DeepSparse" in str(caught.value)


def test_close_stops_the_worker_and_leaves_the_artifact_untouched(dense):
    _, artifact = dense
    before = {p.name: sha256(p) for p in artifact.directory.iterdir()}
    session = BACKEND.load(artifact, WORKLOAD)
    session.logits(window(8, 0))  # compiles with input_shapes, which rewrites its graph file
    workdir, process = session._worker.directory, session._worker.process
    session.close()
    assert process.poll() is not None and not workdir.exists()
    assert {p.name: sha256(p) for p in artifact.directory.iterdir()} == before
    session.close()  # twice is harmless


def test_kernel_claim_rules():
    """Only DeepSparse's kernel names count ("ks_*"); its kernel_sparsity field is the
    weights' zero fraction, non-zero for dense gemm kernels too."""
    weights = [f"model.layers.{i}.mlp.{p}.weight.T" for i in (0, 1) for p in ("up_proj", "down_proj")]

    def phase(name, sparsity, modules):
        layers = [{"name": f"{name}_{n}", "canonical_name": f"/model/model/{m}/MatMul_output_0", "kernel_sparsity": sparsity,
                   "kernel_bits_per_ele": 0.0, "ms": 0.1} for n, m in enumerate(modules)]
        return {"kernel_layers": layers, "batch": 1, "seq": 1, "past": 9, "layers": 50}

    every = [f"layers.{i}/mlp/{p}" for i in (0, 1) for p in ("up_proj", "down_proj")]
    sparse = {"decode": phase("ks_gevm_be-50.0%", 0.5, every), "fraction_of_supported_ops": {"a": 0.96}}
    claim = kernel_claim(sparse, weights)
    assert claim["sparse_kernels"] == "used"
    assert "4 of 4 linear weights run in sparse kernels" in claim["evidence"] and "96.0%" in claim["evidence"]
    assert claim["phases"]["decode"]["kernel_kinds"] == {"ks_gevm_be": 4}
    dense_kernels = {"decode": phase("gemm", 0.0003, every)}  # a dense kernel on nearly dense weights
    assert kernel_claim(dense_kernels, weights)["sparse_kernels"] == "not-used"
    partial = {"decode": phase("gemm", 0.0, every[:1])}
    claim = kernel_claim(partial, weights)
    assert claim["sparse_kernels"] == "unknown" and "pyramid" in claim["evidence"]
    assert kernel_claim({}, weights)["sparse_kernels"] == "unknown"
