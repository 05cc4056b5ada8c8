"""PyTorch as an engine (the cuda target's runtime), on a CPU: the static-cache prefill /
decode steps the GPU captures as graphs, and the dense quantized baselines (bitsandbytes
LLM.int8 and NF4) that sparse builds are reported against. bitsandbytes runs here for real."""

from __future__ import annotations

import pytest
import torch

from sparsedeploy.backends.base import Workload
from sparsedeploy.errors import BadInput
from conftest import EXPECTED_ROLES_ALL, make_tiny_model, save_checkpoint, tiny_configs

WORKLOAD = Workload(eval_seqlen=32, eval_windows=3, prompt_tokens=12, new_tokens=4, batches=(1, 2), runs=2, warmup=1, threads=1)


def greedy_by_transformers(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("model_type", EXPECTED_ROLES_ALL)
def test_static_cache_steps_decode_like_generate(model_type):
    from sparsedeploy.kernels.graphs import build_generation, greedy_tokens

    model = make_tiny_model(model_type)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    generation = build_generation(model, batch=2, prompt_tokens=20, new_tokens=6)
    assert not generation.graphs and not generation.on_gpu
    produced = greedy_tokens(generation, ids)
    assert torch.equal(produced, greedy_by_transformers(model, ids, 6))
    assert torch.equal(greedy_tokens(generation, ids), produced)  # a second prefill starts from an empty cache


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_static_cache_steps_past_a_sliding_window(model_type):
    """A window shorter than prompt + new tokens: transformers' own masks, still exact."""
    from transformers import AutoModelForCausalLM

    from sparsedeploy.kernels.graphs import build_generation, greedy_tokens

    config = tiny_configs()[model_type]
    config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    generation = build_generation(model, batch=2, prompt_tokens=20, new_tokens=6)
    produced = greedy_tokens(generation, ids)
    assert torch.equal(produced, greedy_by_transformers(model, ids, 6))
    assert torch.equal(greedy_tokens(generation, ids), produced)


def test_static_cache_steps_are_timed_per_phase():
    from sparsedeploy.kernels.graphs import build_generation, time_prefill_decode

    generation = build_generation(make_tiny_model("llama"), batch=1, prompt_tokens=16, new_tokens=3)
    samples = time_prefill_decode(generation, runs=3, warmup=1)
    assert len(samples.prefill_ms) == len(samples.decode_ms) == 3
    assert all(ms > 0 for ms in samples.prefill_ms + samples.decode_ms)


@pytest.fixture(scope="module")
def dense_directory(tmp_path_factory):
    # Wide enough for bitsandbytes' blockwise NF4 (blocks of 64) to behave as on a real model.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return save_checkpoint(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("dense") / "tiny")


def evaluation_windows() -> torch.Tensor:
    return torch.randint(0, 256, (WORKLOAD.eval_windows, WORKLOAD.eval_seqlen), generator=torch.Generator().manual_seed(3))


def test_torch_session_gives_the_models_logits(dense_directory):
    from transformers import AutoModelForCausalLM

    from sparsedeploy.backends.torch_runtime import TorchSession

    window = evaluation_windows()[0]
    with TorchSession(dense_directory, torch.float32, "cpu") as session:
        got = session.logits(window)
        kernels = session.kernels()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense_directory).eval()(input_ids=window[None]).logits[0]
    assert got.shape == (WORKLOAD.eval_seqlen, 256)
    assert torch.allclose(got, expected, atol=1e-5)
    assert kernels["sparse_kernels"] == "not-used" and kernels["cuda_graphs"] is False


@pytest.mark.parametrize("baseline, max_kl, layer_class", [("bnb-int8", 2e-3, "Linear8bitLt"), ("bnb-nf4", 0.05, "Linear4bit")])
def test_bitsandbytes_baselines_measured_against_the_dense_build(dense_directory, baseline, max_kl, layer_class):
    from sparsedeploy.backends.torch_runtime import TorchSession
    from sparsedeploy.build.measure import baseline_measurements

    with TorchSession(dense_directory, torch.float32, "cpu", baseline=baseline) as quantized, \
            TorchSession(dense_directory, torch.float32, "cpu") as dense:
        assert type(quantized.model.model.layers[0].mlp.up_proj).__name__ == layer_class
        found = baseline_measurements(quantized, dense, evaluation_windows(), WORKLOAD, baseline)
    quality = found["quality"]
    # quantized, so not identical; close, since a random model's logits are nearly flat
    assert 0 < quality["kl_mean_vs_dense"] < max_kl
    assert 0.5 < quality["top1_vs_dense"] < 1.0 or quality["kl_mean_vs_dense"] < 1e-4
    assert quality["ppl"] > 0 and quality["ppl_dense"] > 0 and quality["ppl"] != quality["ppl_dense"]
    rows = found["latency"]["by_batch"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["baseline"]["decode_tok_s"] > 0 and row["dense"]["prefill_tok_s"] > 0
        assert row["speedup"]["decode"] == pytest.approx(row["dense"]["decode_ms_p50"] / row["baseline"]["decode_ms_p50"])
        assert not any(key.endswith("_runs") for key in row["baseline"])


def test_unknown_baseline_is_refused():
    from sparsedeploy.backends.torch_runtime import quantization_config

    with pytest.raises(BadInput, match="unknown quantized baseline 'bnb-int3'"):
        quantization_config("bnb-int3", torch.float16)


def test_profile_baselines_must_be_ones_the_backend_measures():
    from sparsedeploy.backends.base import get_backend
    from sparsedeploy.build.pipeline import profile_baselines

    cuda = get_backend("torch-cuda")
    assert profile_baselines({"check": {"baselines": ["bnb-int8", "bnb-nf4"]}}, cuda) == ("bnb-int8", "bnb-nf4")
    assert profile_baselines({"check": {}}, get_backend("onnxruntime")) == ()
    with pytest.raises(BadInput, match=r"baseline\(s\) bnb-nf4 that backend 'onnxruntime' does not measure \(it measures: none\)"):
        profile_baselines({"check": {"baselines": ["bnb-nf4"]}}, get_backend("onnxruntime"))
    with pytest.raises(BadInput, match="fix \\[check\\] baselines"):
        profile_baselines({"check": {"baselines": ["gptq"]}}, cuda)


def test_report_puts_baselines_beside_the_dense_and_pruned_builds():
    from sparsedeploy.build.report import _baseline_lines

    speeds = lambda prefill, decode: {"prefill_tok_s": prefill, "decode_tok_s": decode}  # noqa: E731
    report = {
        "precision": "fp16", "checkpoint": {"pattern": "2:4"},
        "quality": {"ppl_dense": 20.0, "ppl_target": 24.5},
        "latency": {"workload": {"batch": 8}, "dense": speeds(1000.0, 300.0), "sparse": speeds(1100.0, 310.0),
                    "speedup": {"prefill": 1.1, "decode": 1.033}, "engine_kernels": {"cuda_graphs": True}},
        "baselines": [
            {"name": "bnb-int8", "description": "LLM.int8", "quality": {"ppl": 20.1, "kl_mean_vs_dense": 0.0012, "top1_vs_dense": 0.98},
             "latency": {"by_batch": [{"batch": 8, "baseline": speeds(500.0, 60.0), "dense": speeds(1000.0, 300.0),
                                       "speedup": {"prefill": 0.5, "decode": 0.2}}]},
             "engine_kernels": {"cuda_graphs": False, "evidence": "dense weights in PyTorch; run without CUDA graphs"}},
            {"name": "bnb-nf4", "description": "NF4", "skipped": "bitsandbytes is not installed"},
        ],
    }
    table = "\n".join(_baseline_lines(report))
    assert "at batch 8" in table
    assert "| dense build (fp16) | 20.000 | 0 | 1 | 1000.0 | 300.0 | 1.00x / 1.00x |" in table
    assert "| pruned build (2:4, fp16) | 24.500 | - | - | 1100.0 | 310.0 | 1.10x / 1.03x |" in table
    assert "| bnb-int8 (eager: no CUDA graphs) | 20.100 | 0.00120 | 0.9800 | 500.0 | 60.0 | 0.50x / 0.20x |" in table
    assert "| bnb-nf4 | skipped: bitsandbytes is not installed |" in table
    assert _baseline_lines({**report, "baselines": []}) == []


# -- the check's baselines, end to end on a CPU ------------------------------------------


def pytorch_on_cpu_backend(missing: str | None = None):
    """The cuda target's runtime without its GPU: the same PyTorch sessions on a CPU (fp32),
    so that the check measures and reports baselines here for real."""
    from sparsedeploy.backends.base import Backend
    from sparsedeploy.backends.torch_runtime import QUANTIZED_BASELINES, TorchSession

    class PyTorchOnCpu(Backend):
        name, engine, device = "pytorch-cpu-test", "pytorch", "cpu"
        baselines = QUANTIZED_BASELINES

        def engine_version(self) -> str:
            return f"torch {torch.__version__}"

        def baseline_unavailable(self, name: str) -> str | None:
            return missing

        def load(self, artifact, workload):
            return TorchSession(artifact.directory, torch.float32, "cpu")

        def load_baseline(self, name, dense, workload):
            return TorchSession(dense.directory, torch.float32, "cpu", baseline=name)

    return PyTorchOnCpu()


def cpu_check_inputs(dense_directory, tmp_path, backend):
    from transformers import AutoModelForCausalLM

    from sparsedeploy.backends.base import BuiltArtifact
    from sparsedeploy.build.pipeline import CheckInputs
    from sparsedeploy.data.sources import TextSource
    from sparsedeploy.kernels.semi_structured import TWO_OF_FOUR, named_linears
    from sparsedeploy.prune.masks import nm_mask
    from sparsedeploy.prune.scores import magnitude_scores

    pruned = AutoModelForCausalLM.from_pretrained(dense_directory).eval()
    with torch.no_grad():
        for _, linear in named_linears(pruned):
            linear.weight.mul_(nm_mask(magnitude_scores(linear.weight), TWO_OF_FOUR))
    pruned_directory = save_checkpoint(pruned, tmp_path / "pruned")
    artifact = lambda directory: BuiltArtifact(directory, "model.safetensors", "fp32",  # noqa: E731
                                               {"sparsity": 0.0, "compliance": {"2:4": 1.0, "4:8": 1.0}})
    return CheckInputs(
        profile={"check": {"baselines": list(backend.baselines)}, "gates": {"max_kl_mean": 0.01}}, precision="fp32",
        backend=backend, workload=WORKLOAD, sparse=artifact(pruned_directory), dense=artifact(dense_directory),
        sparse_key=None, dense_key=None, reference_model_loader=lambda: pruned, reference_sha="pruned",
        data=TextSource("random-ids", "not read: the windows are given"), windows=evaluation_windows(), same_shapes=True,
        fresh=True, baselines=tuple(backend.baselines),
    )


def compose(inputs, results) -> dict:
    from sparsedeploy.build.pipeline import artifact_summary, compose_report

    checkpoint = {"path": "pruned", "sha256": "pruned", "sparsity": 0.5, "pattern": "2:4",
                  "nm_compliance": {"2:4": 1.0, "4:8": 1.0}, "parameters": 1, "dense_source": {"sha256": "dense", "parameters": 1}}
    return compose_report("pytorch-cpu-test", inputs, checkpoint, artifact_summary(inputs.sparse, None), results)


def test_check_measures_baselines_beside_the_builds(dense_directory, tmp_path):
    from sparsedeploy.build.pipeline import run_check
    from sparsedeploy.build.report import render_markdown

    inputs = cpu_check_inputs(dense_directory, tmp_path, pytorch_on_cpu_backend())
    results = run_check(inputs)
    assert [b["name"] for b in results.baselines] == ["bnb-int8", "bnb-nf4"]
    report = compose(inputs, results)
    by_name = {b["name"]: b for b in report["baselines"]}
    # each measured against the dense build: the same dense perplexity the check measured
    for baseline in by_name.values():
        assert baseline["quality"]["ppl_dense"] == pytest.approx(report["quality"]["ppl_dense"], rel=1e-6)
        assert baseline["latency"]["by_batch"][0]["batch"] == 1
        assert baseline["engine_kernels"]["cuda_graphs"] is False  # eager on a CPU, and said
    assert by_name["bnb-int8"]["quality"]["kl_mean_vs_dense"] < by_name["bnb-nf4"]["quality"]["kl_mean_vs_dense"]
    assert all(gate["name"] == "max_kl_mean" for gate in report["gates"])  # baselines are never gated
    markdown = render_markdown(report)
    assert "## Dense quantized baselines" in markdown and "| bnb-nf4 | " in markdown


def test_check_says_why_a_baseline_was_skipped(dense_directory, tmp_path):
    from sparsedeploy.build.pipeline import run_check
    from sparsedeploy.build.report import render_markdown

    backend = pytorch_on_cpu_backend(missing="bitsandbytes is not installed: pip install 'sparsedeploy[cuda]'")
    inputs = cpu_check_inputs(dense_directory, tmp_path, backend)
    report = compose(inputs, run_check(inputs))
    assert [b.get("skipped", "")[:26] for b in report["baselines"]] == ["bitsandbytes is not instal"] * 2
    assert "| bnb-int8 | skipped: bitsandbytes is not installed: pip install 'sparsedeploy[cuda]' |" in render_markdown(report)
