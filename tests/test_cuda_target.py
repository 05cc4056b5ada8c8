"""The cuda target (PyTorch + cuSPARSELt 2:4 under CUDA graphs).

The kernel choice logic runs everywhere; the kernels themselves need an NVIDIA GPU and
are marked ``gpu`` (not in `make test`; `make test-gpu` on a GPU machine runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsedeploy.backends.base import Workload
from sparsedeploy.kernels.semi_structured import (
    TWO_OF_FOUR,
    KernelTiming,
    LayerPlan,
    choose_kernel,
    is_2of4,
    nearest_planned,
    padded_tokens,
    plan_summary,
    sparse_ineligibility,
)
from conftest import REPOSITORY, make_tiny_model, save_tokenized_tiny, small_profile

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def two_of_four(rows: int, cols: int, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    from sparsedeploy.prune.masks import nm_mask
    from sparsedeploy.prune.scores import magnitude_scores

    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return (weight * nm_mask(magnitude_scores(weight), TWO_OF_FOUR)).to(device=device, dtype=dtype)


def test_2of4_detection_and_eligibility():
    weight = two_of_four(32, 64)
    assert is_2of4(weight)
    assert sparse_ineligibility(weight) is None
    broken = weight.clone()
    broken[3, 0:4] = 1.0  # one group with four non-zeros
    assert not is_2of4(broken)
    assert sparse_ineligibility(broken) == "not 2:4 sparse"
    # 2:4 along the output dimension is not 2:4 for the kernel, which groups inputs
    assert not is_2of4(two_of_four(64, 32).t().contiguous())
    assert "multiple of 16" in sparse_ineligibility(two_of_four(24, 64))


def test_token_padding_and_nearest_plan():
    assert [padded_tokens(n) for n in (1, 15, 16, 17, 512)] == [16, 16, 16, 32, 512]
    planned = [1, 8, 32, 512, 4096, 16384]
    assert nearest_planned(1, planned) == 1
    assert nearest_planned(600, planned) == 512
    assert nearest_planned(3000, planned) == 4096
    assert nearest_planned(1024, [512, 4096]) == 512  # log scale: 1024 is 2x from 512, 4x from 4096


def test_kernel_choice_needs_a_margin():
    assert choose_kernel(KernelTiming(16, dense_ms=1.0, sparse_ms=0.8)) == "sparse"
    assert choose_kernel(KernelTiming(16, dense_ms=1.0, sparse_ms=0.99)) == "dense"  # within noise: dense
    assert choose_kernel(KernelTiming(16, dense_ms=1.0, sparse_ms=1.5)) == "dense"


def test_plan_round_trip_and_summary():
    timings = [KernelTiming(16, 1.0, 2.0), KernelTiming(4096, 4.0, 2.5)]
    plan = LayerPlan("model.layers.0.mlp.up_proj", (128, 64), {16: "dense", 4096: "sparse"}, timings)
    kept = LayerPlan("model.layers.0.self_attn.k_proj", (24, 64), {16: "dense", 4096: "dense"}, reason="shape")
    restored = LayerPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored.kernels == plan.kernels and restored.shape == plan.shape
    assert [t.ratio for t in restored.timings] == [0.5, 1.6]
    summary = plan_summary([plan, kept])
    assert summary["16"] == {"sparse_layers": 0, "layers": 2, "linear_speedup": 1.0}
    assert summary["4096"]["sparse_layers"] == 1 and summary["4096"]["linear_speedup"] == pytest.approx(1.6)


def test_planned_token_counts_cover_the_workload():
    from sparsedeploy.backends.torch_cuda import planned_token_counts

    workload = Workload(eval_seqlen=1024, eval_windows=4, prompt_tokens=512, new_tokens=128, batches=(1, 8, 32),
                        runs=3, warmup=1, threads=1)
    assert planned_token_counts(workload) == [1, 8, 32, 512, 1024, 4096, 16384]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_build_without_gpu_exits_3(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparsedeploy", "build", "--target", "cuda", "--model", "default",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPOSITORY)
    assert result.returncode == 3
    assert "no CUDA GPU" in result.stderr and "cuda" in result.stderr
    assert not (tmp_path / "out").exists()


# -- on a GPU -------------------------------------------------------------------------


def tiny_2of4_llama(dtype=torch.float16):
    """A tiny Llama whose linear layers are 2:4 and 16-aligned (cuSPARSELt's minimum)."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                module.weight.copy_(two_of_four(*module.weight.shape, seed=module.weight.numel()))
    return model.to(device="cuda", dtype=dtype)


def linear_2of4_on_gpu(tokens: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """An fp16 2:4 linear layer on the GPU, an input of ``tokens`` per sequence, and the
    float32 product the planned layers must match."""
    linear = nn.Linear(256, 128, bias=True).to("cuda", torch.float16)
    with torch.no_grad():
        linear.weight.copy_(two_of_four(128, 256, dtype=torch.float16, device="cuda"))
    x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.float16)
    return linear, x, nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 7, 16, 100, 512])
def test_sparse_linear_matches_dense(tokens):
    from sparsedeploy.kernels.semi_structured import PlannedLinear

    linear, x, expected = linear_2of4_on_gpu(tokens)
    sparse = PlannedLinear(linear, {1: "sparse", 4096: "sparse"})
    assert sparse.weight is None  # a sparse-only plan keeps the compressed form alone
    got = sparse(x).float()
    assert got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 3e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 7, 16, 100, 512])
def test_int8_sparse_linear_matches_float(tokens):
    from sparsedeploy.kernels.int8 import Int8PlannedLinear

    linear, x, expected = linear_2of4_on_gpu(tokens)
    for kernel in ("sparse", "dense"):
        planned = Int8PlannedLinear(linear, {1: kernel, 4096: kernel})
        with torch.no_grad():
            got = planned(x).float()
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < 0.02, kernel


@pytest.mark.gpu
@needs_gpu
def test_int8_plan_is_timed_and_runs_under_graphs():
    from sparsedeploy.kernels.graphs import build_generation, greedy_tokens
    from sparsedeploy.kernels.semi_structured import apply_plan, named_linears, plan_layers

    model = tiny_2of4_llama()
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float().log_softmax(-1)
    plans = plan_layers(named_linears(model), [2, 80], int8=True)
    assert all(plan.timings or plan.reason for plan in plans)
    apply_plan(model, plans, int8=True)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float().log_softmax(-1)
    assert float((expected.exp() * (expected - got)).sum(-1).mean()) < 0.01
    generation = build_generation(model, batch=2, prompt_tokens=40, new_tokens=4, graphs=True)
    assert generation.graphs and greedy_tokens(generation, ids).shape == (2, 4)


@pytest.mark.gpu
@needs_gpu
def test_planned_model_and_graphs_match_eager_transformers():
    from sparsedeploy.kernels.graphs import build_generation, greedy_tokens
    from sparsedeploy.kernels.semi_structured import LayerPlan, apply_plan
    from sparsedeploy.models.adapters import adapter_for

    reference = tiny_2of4_llama()
    model = tiny_2of4_llama()
    plans = [LayerPlan(linear.name, linear.shape, {1: "sparse", 64: "dense", 256: "sparse"})
             for linear in adapter_for(model).linear_sublayers()]
    apply_plan(model, plans)
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        got = model(input_ids=ids).logits.float()
    assert float((got - expected).norm() / expected.norm()) < 1e-2
    # greedy continuation through the captured prefill/decode graphs = transformers' generate;
    # in float32, where a random model's near-ties do not flip between attention paths
    model = tiny_2of4_llama(torch.float32)
    generation = build_generation(model, batch=2, prompt_tokens=40, new_tokens=8, graphs=True)
    produced = greedy_tokens(generation, ids)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                       min_new_tokens=8)[:, 40:]
    assert torch.equal(produced, generated)
    # a second prefill replay starts from an empty cache again
    assert torch.equal(greedy_tokens(generation, ids), produced)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("baseline", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_baseline_on_the_gpu_decodes_as_it_does_eagerly(tmp_path, baseline):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsedeploy.backends.torch_runtime import TorchSession
    from sparsedeploy.kernels.graphs import build_generation, greedy_tokens

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    with TorchSession(tmp_path / "dense", torch.float16, "cuda", graphs=True, baseline=baseline) as session:
        generation = session.generation(2, 24, 6)
        assert generation.graphs or session.graphs_note  # captured, or the report says why not
        produced = greedy_tokens(generation, ids)
        assert torch.equal(greedy_tokens(build_generation(session.model, 2, 24, 6, graphs=False), ids), produced)
        samples = session.measure_latency(2, 24, 6, runs=2, warmup=1)
        assert len(samples.decode_ms) == 2 and min(samples.decode_ms) > 0
        assert session.kernels()["cuda_graphs"] == generation.graphs


@pytest.mark.gpu
@needs_gpu
def test_build_cuda_end_to_end(tmp_path, default_checkpoint):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "cuda.toml").write_text(small_profile("cuda"))
    dense = save_tokenized_tiny(tmp_path / "dense", default_checkpoint, hidden_size=128, intermediate_size=256)
    pruned = tmp_path / "pruned"
    env = {**os.environ, "SPARSEDEPLOY_TARGETS": str(targets)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "sparsedeploy", *args], capture_output=True, text=True,  # noqa: E731
                                       cwd=REPOSITORY, env=env)
    pruned_run = run("prune", str(dense), "-o", str(pruned), "--method", "magnitude", "--pattern", "2:4")
    assert pruned_run.returncode == 0, pruned_run.stderr
    built = run("build", "--target", "cuda", "--model", str(pruned), "-o", str(tmp_path / "bundle"), "--json")
    assert built.returncode in (0, 1), built.stderr
    report = json.loads(built.stdout)
    assert report["engine"]["device"] == "cuda"
    assert report["artifact"]["nm_compliance"]["2:4"] == 1.0
    layers = report["latency"]["engine_kernels"]["layers"]
    assert len(layers) == 14 and all(layer["timings"] for layer in layers)
    assert report["quality"]["kl_mean"] < 0.01
    assert "linear layers on cuSPARSELt 2:4" in report["latency"]["evidence"]
    markdown = (tmp_path / "bundle" / "report.md").read_text()
    assert markdown.count("cuSPARSELt") >= 1
    # the dense model quantized by bitsandbytes instead, measured beside it
    assert [b["name"] for b in report["baselines"]] == ["bnb-int8", "bnb-nf4"]
    for baseline in report["baselines"]:
        assert "skipped" not in baseline, baseline
        assert 0 <= baseline["quality"]["kl_mean_vs_dense"] < 0.5
        assert baseline["quality"]["ppl"] != baseline["quality"]["ppl_dense"]  # quantized: not the dense logits
        assert baseline["latency"]["by_batch"][0]["baseline"]["decode_tok_s"] > 0
    assert "## Dense quantized baselines" in markdown


def test_report_lists_the_kernel_plan_per_layer():
    from sparsedeploy.build.report import _kernel_plan_lines

    up = LayerPlan("model.layers.0.mlp.up_proj", (11008, 4096), {16: "dense", 2048: "sparse"},
                   [KernelTiming(16, 0.037, 0.033 * 1.2), KernelTiming(2048, 0.27, 0.21)])
    twin = LayerPlan("model.layers.1.mlp.up_proj", up.shape, dict(up.kernels), up.timings)
    odd = LayerPlan("model.layers.0.self_attn.k_proj", (24, 64), {16: "dense", 2048: "dense"}, reason="shape 24x64")
    lines = _kernel_plan_lines({"layers": [p.to_dict() for p in (up, twin, odd)]})
    table = "\n".join(lines)
    assert "| 16 tok | 2048 tok |" in table
    assert "model.layers.0.mlp.up_proj and 1 more | 11008x4096 | dense (0.93x) | 2:4 (1.29x) |" in table
    assert "k_proj (shape 24x64) | 24x64 | dense | dense |" in table
    assert _kernel_plan_lines({"layers": [{"name": "gemm", "sparse": True}]}) == []  # another engine's records


@pytest.mark.parametrize("precision", ["int4", "fp32", "fp8"])
def test_cuda_target_refuses_precisions_it_does_not_build(precision):
    from sparsedeploy.backends.torch_cuda import TorchCudaBackend
    from sparsedeploy.errors import BadInput

    workload = Workload(eval_seqlen=64, eval_windows=2, prompt_tokens=16, new_tokens=4, batches=(1,), runs=1, warmup=0,
                        threads=1)
    with pytest.raises(BadInput, match="builds fp16, bf16, int8, not "):
        TorchCudaBackend().build_settings(precision, workload, {})


# -- int8 (W8A8): the math on a CPU, where torch._int_mm runs too ---------------------------


def test_int8_weights_keep_every_pruned_zero_and_the_2of4_pattern():
    from sparsedeploy.kernels.int8 import INT8_MAX, quantize_weight_rows

    weight = two_of_four(64, 128, seed=3)
    weight[5] = 0  # an all-zero row: scale 1, all zeros
    quantized, scale = quantize_weight_rows(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (64,) and scale[5] == 1
    assert bool((quantized[weight == 0] == 0).all())
    assert is_2of4(quantized.float())
    assert int(quantized.abs().amax(dim=1)[torch.arange(64) != 5].min()) == INT8_MAX  # each row uses the full range
    error = (quantized.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())


def test_int8_tokens_are_quantized_per_row():
    from sparsedeploy.kernels.int8 import quantize_tokens

    x = torch.randn(5, 32) * torch.tensor([0.01, 1.0, 100.0, 0.0, 3.0])[:, None]
    quantized, scale = quantize_tokens(x)
    assert quantized.dtype == torch.int8 and scale.shape == (5, 1)
    assert torch.equal(quantized[3], torch.zeros(32, dtype=torch.int8))
    assert bool(((quantized.float() * scale - x).abs() <= scale / 2 + 1e-6).all())


def test_int8_products_on_a_cpu_equal_torch_int_mm():
    from sparsedeploy.kernels.int8 import dense_int8_matmul

    generator = torch.Generator().manual_seed(6)
    x_q = torch.randint(-127, 128, (33, 1536), dtype=torch.int8, generator=generator)
    weight_q = torch.randint(-127, 128, (40, 1536), dtype=torch.int8, generator=generator)
    x_q[0] = 127  # the largest sums, where float32 would round
    weight_q[0] = 127
    assert torch.equal(dense_int8_matmul(x_q, weight_q), torch._int_mm(x_q, weight_q.t()))


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_int8_linear_on_the_dense_kernel_matches_float(tokens):
    from sparsedeploy.kernels.int8 import Int8PlannedLinear

    linear = nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(two_of_four(64, 128, seed=4))
    planned = Int8PlannedLinear(linear, {1: "dense", 512: "dense"})
    assert planned.compressed is None and planned.weight_q.dtype == torch.int8  # only the forms the plan runs
    x = torch.randn(2, tokens, 128)
    with torch.no_grad():
        expected, got = linear(x), planned(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float((got - expected).norm() / expected.norm()) < 0.02


def test_int8_plan_applied_to_a_model_keeps_its_predictions():
    from sparsedeploy.kernels.int8 import Int8PlannedLinear
    from sparsedeploy.kernels.semi_structured import apply_plan, named_linears

    model = make_tiny_model("llama")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.log_softmax(-1)
    plans = [LayerPlan(name, tuple(linear.weight.shape), {1: "dense", 64: "dense"}) for name, linear in named_linears(model)]
    apply_plan(model, plans, int8=True)
    assert all(isinstance(module, Int8PlannedLinear) for name, module in model.named_modules() if name in {p.name for p in plans})
    with torch.no_grad():
        got = model(input_ids=ids).logits.log_softmax(-1)
    kl = float((expected.exp() * (expected - got)).sum(-1).mean())
    assert kl < 1e-3
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) > 0.9
