"""2:4 on an NVIDIA GPU: cuSPARSELt against dense cuBLAS, per layer and whole model.

The default model's layers (576 wide) are too small for 2:4 to pay on a GPU, so speed is
measured on Llama-shaped models with random weights, 2:4 masks by magnitude:
  1b: hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads (TinyLlama's shape)
  7b: hidden 4096, FFN 11008, 32 layers, 32 heads (Llama-2-7B's shape)

probe:  the ways to call one 2:4 GEMM (cuSPARSELt directly in several layouts, ours, torch's
        semi-structured tensor) at 4096x4096 and 11008x4096, 16 / 128 / 2048 tokens: time
        under graphs and eagerly, error against float32, ours with cuSPARSELt's
        algorithm id and split-K swept by hand, and the int8 GEMMs (2:4 with int32 out in
        two layouts, dense _int_mm) checked for exactness.
layers: every distinct linear shape, x @ W^T at 1..16384 tokens, median over CUDA-event
        timings: fp16 dense vs fp16 2:4, with and without CUDA graphs; int8 dense
        (torch._int_mm) and int8 2:4 (cuSPARSELt) against fp16 dense.
models: whole model, prefill (batch 1, 512 and 2048 tokens) and decode (batch 1, 16, 64;
        a 128-token prompt, 64 new tokens), dense vs 2:4 where the per-layer plan chose
        it (sparse_ms < dense_ms / 1.03), and vs all-2:4, under CUDA graphs; eager too.
baselines: the same shapes for the dense model quantized by bitsandbytes (LLM.int8, NF4),
        saved and loaded as its users load it (from_pretrained with a quantization config),
        under CUDA graphs where bitsandbytes' layers can be captured, else eagerly (said).
        Random weights have no outlier features: LLM.int8 runs its fastest path here.

Asserts nothing; prints a table and writes JSON (with the device name) to --out.

    python benchmarks/gpu_24.py [--part layers models baselines] [--sizes 1b 7b] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsedeploy.kernels.graphs import build_generation, time_prefill_decode  # noqa: E402
from sparsedeploy.backends.base import cuda_gpu  # noqa: E402
from sparsedeploy.backends.torch_runtime import QUANTIZED_BASELINES, TorchSession, bitsandbytes_missing  # noqa: E402
from sparsedeploy.kernels.semi_structured import (  # noqa: E402
    TWO_OF_FOUR,
    apply_plan,
    compress,
    named_linears,
    plan_layers,
    plan_summary,
    sparse_linear,
    time_call,
)
from sparsedeploy.kernels.int8 import quantize_rows  # noqa: E402
from sparsedeploy.prune.masks import nm_mask  # noqa: E402
from sparsedeploy.prune.scores import magnitude_scores  # noqa: E402

SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
}
LAYER_TOKENS = [1, 16, 64, 128, 512, 2048, 8192, 16384]
PREFILL = [(1, 512), (1, 2048)]
DECODE_BATCHES = [1, 16, 64]
DECODE_PROMPT, DECODE_STEPS = 128, 64


def linear_shapes(size: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[size]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    shapes = {"q/o": (s["hidden_size"], s["hidden_size"]), "k/v": (kv, s["hidden_size"]),
              "gate/up": (s["intermediate_size"], s["hidden_size"]), "down": (s["hidden_size"], s["intermediate_size"])}
    return {name: shape for name, shape in shapes.items() if not (name == "k/v" and kv == s["hidden_size"])}


def masked_2of4(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4, with the pruning code's own mask (the 2 largest of every 4 inputs)."""
    return weight * nm_mask(magnitude_scores(weight), TWO_OF_FOUR)


def bench_layers(size: str, rows: list[dict]) -> None:
    for name, (out_f, in_f) in linear_shapes(size).items():
        weight = masked_2of4(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02)
        compressed = compress(weight)
        w8, w_scale = quantize_rows(weight)
        w8 = masked_2of4(w8.float()).to(torch.int8)  # rounding keeps zeros, but be exact
        compressed8 = torch._cslt_compress(w8)
        for tokens in LAYER_TOKENS:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            # correctness first: the sparse product must equal the dense one
            ref = F.linear(x.float(), weight.float())
            got = sparse_linear(compressed, x).float()
            rel = float((got - ref).norm() / ref.norm())
            row = {"size": size, "layer": name, "shape": [out_f, in_f], "tokens": tokens, "sparse_rel_err": rel}
            for graphs in (True, False):
                tag = "graph" if graphs else "eager"
                repeats, samples = (20, 7) if graphs else (5, 3)
                row[f"fp16_dense_ms_{tag}"] = time_call(lambda: F.linear(x, weight), repeats, samples, graphs)
                row[f"fp16_24_ms_{tag}"] = time_call(lambda: sparse_linear(compressed, x), repeats, samples, graphs)
            x8, _ = quantize_rows(x)
            if tokens > 16:  # torch._int_mm needs more than 16 rows
                row["int8_dense_ms_graph"] = time_call(lambda: torch._int_mm(x8, w8.t()), graphs=True)
            try:
                x8p = x8 if tokens % 16 == 0 else F.pad(x8, (0, 0, 0, 16 - tokens % 16))
                row["int8_24_ms_graph"] = time_call(
                    lambda: torch._cslt_sparse_mm(compressed8, x8p.t(), out_dtype=torch.int32, transpose_result=True), graphs=True)
                row["int8_24_out"] = "int32"
            except RuntimeError as error:  # older cuSPARSELt: int8 out only
                row["int8_24_error_int32"] = str(error).splitlines()[0][:160]
                try:
                    row["int8_24_ms_graph"] = time_call(
                        lambda: torch._cslt_sparse_mm(compressed8, x8p.t(), transpose_result=True), graphs=True)
                    row["int8_24_out"] = "int8"
                except RuntimeError as error2:
                    row["int8_24_error"] = str(error2).splitlines()[0][:160]
            dense = row["fp16_dense_ms_graph"]
            row["speedup_fp16_24_graph"] = dense / row["fp16_24_ms_graph"]
            row["speedup_fp16_24_eager"] = row["fp16_dense_ms_eager"] / row["fp16_24_ms_eager"]
            if "int8_24_ms_graph" in row:
                row["speedup_int8_24_vs_fp16"] = dense / row["int8_24_ms_graph"]
            if "int8_dense_ms_graph" in row:
                row["speedup_int8_dense_vs_fp16"] = dense / row["int8_dense_ms_graph"]
            rows.append(row)
            print(f"{size} {name:8s} {tokens:6d} tok  fp16 2:4 graph {row['speedup_fp16_24_graph']:.2f}x  "
                  f"eager {row['speedup_fp16_24_eager']:.2f}x  int8 2:4 vs fp16 {row.get('speedup_int8_24_vs_fp16', float('nan')):.2f}x  "
                  f"int8 dense vs fp16 {row.get('speedup_int8_dense_vs_fp16', float('nan')):.2f}x  err {rel:.1e}", flush=True)
        compressed = compressed8 = None  # free this layer's GPU copies before the next shape


def probe(rows: list[dict]) -> None:
    """Absolute times of the ways to call a 2:4 GEMM, to see where time goes."""
    from torch.sparse import to_sparse_semi_structured

    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        weight = masked_2of4(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
        compressed = torch._cslt_compress(weight)
        subclass = to_sparse_semi_structured(weight)
        for tokens in (16, 128, 2048):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            alg = 0
            ways = {
                "dense": lambda: F.linear(x, weight),
                "cslt": lambda: torch._cslt_sparse_mm(compressed, x.t(), transpose_result=True),
                "cslt_contig_B": lambda: torch._cslt_sparse_mm(compressed, x.t().contiguous()),
                "ours": lambda: sparse_linear(compressed, x),  # what the cuda target runs
                "subclass": lambda: F.linear(x, subclass),
            }
            row = {"shape": [out_f, in_f], "tokens": tokens, "alg": alg}
            expected = F.linear(x.float(), weight.float())
            for name, fn in ways.items():
                started = time.perf_counter()
                result = fn()
                torch.cuda.synchronize()
                row[f"{name}_first_ms"] = (time.perf_counter() - started) * 1000
                # each form's product against float32, whatever its layout: a fast wrong form must show
                result = result if tuple(result.shape) == (tokens, out_f) else result.t()
                row[f"{name}_rel_err"] = float((result.float() - expected).norm() / expected.norm())
                row[f"{name}_graph_us"] = time_call(fn, repeats=10, samples=5, graphs=True) * 1000
                row[f"{name}_eager_us"] = time_call(fn, repeats=5, samples=3, graphs=False) * 1000
            row.update(tuned_cslt(compressed, x, expected))
            row.update(int8_forms(weight, x))
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def int8_forms(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """The int8 GEMMs an INT8 2:4 build would run (weights per output channel, activations
    per token; zeros kept), each checked for exactness against a float64 product of the
    same int8 operands, and timed under graphs: cuSPARSELt 2:4 with int32 output, its
    result transposed by the library or by a view, and the dense int8 GEMM."""
    tokens, out_f = x.shape[0], weight.shape[0]
    w8, _ = quantize_rows(weight)
    w8 = masked_2of4(w8.float()).to(torch.int8)
    x8, _ = quantize_rows(x)
    compressed8 = torch._cslt_compress(w8)
    exact = x8.double() @ w8.double().t()
    ways = {
        "int8_24_transposed": lambda: torch._cslt_sparse_mm(compressed8, x8.t(), out_dtype=torch.int32, transpose_result=True),
        "int8_24_view": lambda: torch._cslt_sparse_mm(compressed8, x8.t(), out_dtype=torch.int32).t(),
        "int8_dense": lambda: torch._int_mm(x8, w8.t()),
    }
    row = {}
    for name, fn in ways.items():
        try:
            result = fn()
            torch.cuda.synchronize()
        except RuntimeError as error:
            row[f"{name}_error"] = str(error).splitlines()[0][:160]
            continue
        result = result if tuple(result.shape) == (tokens, out_f) else result.t()
        row[f"{name}_max_abs_err"] = float((result.double() - exact).abs().max())
        row[f"{name}_graph_us"] = time_call(fn, repeats=10, samples=5, graphs=True) * 1000
    return row


def tuned_cslt(compressed: torch.Tensor, x: torch.Tensor, expected: torch.Tensor) -> dict:
    """Our call form with cuSPARSELt's algorithm and split-K swept by hand (its own search,
    _cslt_sparse_mm_search, raised "internal error" on this machine): the fastest correct
    setting under graphs. Alg ids the library does not have raise, and are skipped."""
    best: dict = {}
    for alg_id in range(4):
        for split_k in (1, 2, 4, 8):
            def call(alg_id=alg_id, split_k=split_k):
                return torch._cslt_sparse_mm(compressed, x.t(), alg_id=alg_id, split_k=split_k).t()

            try:
                result = call()
                torch.cuda.synchronize()
            except RuntimeError:
                continue
            error = float((result.float() - expected).norm() / expected.norm())
            if error > 1e-2:
                continue
            graph_us = time_call(call, repeats=10, samples=5, graphs=True) * 1000
            if not best or graph_us < best["tuned_graph_us"]:
                best = {"tuned_graph_us": graph_us, "tuned_alg_id": alg_id, "tuned_split_k": split_k, "tuned_rel_err": error}
    return best


def random_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[size])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    linears = named_linears(model)
    with torch.no_grad():
        for _, linear in linears:
            linear.weight.copy_(masked_2of4(linear.weight))
    return model, linears


def time_model(generation_for, label: str, results: list[dict], size: str, runs: int = 5) -> None:
    """Prefill and decode of one build; ``generation_for(batch, prompt, new_tokens)`` gives
    its steps (graphs or eager: the row records which ran)."""
    for batch, prompt in PREFILL:
        generation = generation_for(batch, prompt, 1)
        prefill_ms = time_prefill_decode(generation, runs, 2).prefill_ms
        results.append({"size": size, "build": label, "graphs": generation.graphs, "phase": "prefill", "batch": batch,
                        "prompt": prompt, "ms": statistics.median(prefill_ms),
                        "tok_s": batch * prompt * 1000 / statistics.median(prefill_ms)})
        del generation
    for batch in DECODE_BATCHES:
        generation = generation_for(batch, DECODE_PROMPT, DECODE_STEPS)
        decode_ms = time_prefill_decode(generation, runs, 1).decode_ms
        results.append({"size": size, "build": label, "graphs": generation.graphs, "phase": "decode", "batch": batch,
                        "prompt": DECODE_PROMPT, "ms": statistics.median(decode_ms),
                        "tok_s": batch * 1000 / statistics.median(decode_ms)})
        del generation
    torch.cuda.empty_cache()


def steps_of(model, graphs: bool):
    return lambda batch, prompt, new_tokens: build_generation(model, batch, prompt, new_tokens, graphs=graphs)


def bench_models(size: str, results: list[dict], plans_out: dict) -> None:
    model, linears = random_model(size)
    for graphs in (True, False):
        time_model(steps_of(model, graphs), "dense", results, size)
    tokens = sorted({b * p for b, p in PREFILL} | set(DECODE_BATCHES))
    started = time.perf_counter()
    plans = plan_layers(linears, tokens)
    plans_out[size] = {"seconds": time.perf_counter() - started, "summary": plan_summary(plans)}
    forced = [type(p)(p.name, p.shape, {t: "sparse" for t in p.kernels}, p.timings) for p in plans]
    apply_plan(model, plans)
    del linears  # the replaced dense layers go with them
    for graphs in (True, False):
        time_model(steps_of(model, graphs), "2:4 planned", results, size)
    del model
    torch.cuda.empty_cache()
    model, _ = random_model(size)
    apply_plan(model, forced)
    time_model(steps_of(model, True), "2:4 everywhere", results, size)
    del model
    torch.cuda.empty_cache()


def bench_baselines(size: str, results: list[dict]) -> None:
    missing = bitsandbytes_missing()
    if missing:
        print(f"baselines skipped: {missing}", flush=True)
        return
    model, linears = random_model(size)
    del linears
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
        for name in QUANTIZED_BASELINES:
            with TorchSession(Path(directory), torch.float16, "cuda", graphs=True, baseline=name) as session:
                time_model(session.generation, name, results, size)
                if session.graphs_note:
                    print(f"{name}: {session.graphs_note}", flush=True)


QUANTIZED_BUILDS = tuple(QUANTIZED_BASELINES)
OTHER_BUILDS = ("2:4 planned", "2:4 everywhere", *QUANTIZED_BUILDS)


def print_model_table(results: list[dict]) -> None:
    """Tokens/s per build against dense under the same graphs setting (a bitsandbytes row
    that could not be captured is marked "eager" against the graphed dense)."""
    print("\n| size | phase | batch x tokens | graphs | dense tok/s | " + " | ".join(OTHER_BUILDS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(OTHER_BUILDS))
    index = {(r["size"], r["build"], r["phase"], r["batch"], r["prompt"], r["graphs"]): r for r in results}
    for r in results:
        if r["build"] != "dense":
            continue
        key = (r["size"], r["phase"], r["batch"], r["prompt"])

        def cell(build: str) -> str:
            other = index.get((key[0], build, *key[1:], r["graphs"]))
            if other is None and r["graphs"] and build.startswith("bnb"):
                other = index.get((key[0], build, *key[1:], False))
                return f"{other['tok_s']:.0f} ({r['ms'] / other['ms']:.2f}x, eager)" if other else "-"
            return f"{other['tok_s']:.0f} ({r['ms'] / other['ms']:.2f}x)" if other else "-"

        shape = f"{r['batch']} x {r['prompt']}" if r["phase"] == "prefill" else f"{r['batch']} x 1"
        print(f"| {r['size']} | {r['phase']} | {shape} | {'yes' if r['graphs'] else 'no'} | {r['tok_s']:.0f} | "
              + " | ".join(cell(build) for build in OTHER_BUILDS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["layers", "models"], choices=["probe", "layers", "models", "baselines"])
    parser.add_argument("--sizes", nargs="+", default=["1b", "7b"], choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_24.json")
    args = parser.parse_args()
    has_gpu, device = cuda_gpu()
    if not has_gpu:
        raise SystemExit(f"gpu_24 needs an NVIDIA GPU (sm_80+) with a CUDA build of torch: {device}")
    output = {"device": device, "torch": torch.__version__,
              "cusparselt": torch.backends.cusparselt.version(), "cuda": torch.version.cuda,
              "layers": [], "models": [], "plans": {}, "probe": []}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("device") == output["device"]:
            output.update({k: previous[k] for k in ("layers", "models", "plans") if k in previous})
    if "probe" in args.part:
        probe(output["probe"])
        args.out.write_text(json.dumps(output, indent=1) + "\n")
    for size in args.sizes:
        if "layers" in args.part:
            output["layers"] = [r for r in output["layers"] if r["size"] != size]
            bench_layers(size, output["layers"])
        if "models" in args.part:
            output["models"] = [r for r in output["models"] if r["size"] != size or r["build"] in QUANTIZED_BUILDS]
            bench_models(size, output["models"], output["plans"])
        if "baselines" in args.part:
            output["models"] = [r for r in output["models"] if r["size"] != size or r["build"] not in QUANTIZED_BUILDS]
            bench_baselines(size, output["models"])
        if {"models", "baselines"} & set(args.part):
            print_model_table([r for r in output["models"] if r["size"] == size])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=1) + "\n")
    print(f"\nwrote {args.out} ({output['device']}, torch {output['torch']}, cuSPARSELt {output['cusparselt']})")


if __name__ == "__main__":
    main()
