"""The CPU targets on the default model: {Wanda 50%, Wanda 70%, Wanda 2:4} x
{fp32, int8, int4 where the engine has it} x {onnxruntime, deepsparse}. Each report
carries the dense model on the same engine and precision (its perplexity on target and
its latency, alternated with the sparse build), so `--models dense` is only needed to
see the dense build compared with itself.

Each cell is one real `sparsedeploy build --target T --model M --quant Q --json`: the
artifact runs in its engine, quality against the PyTorch reference on WikiText-2, and
prefill/decode timed against the dense build of the same engine and precision, the two
alternated run by run (the machine is noisy; ratios are what carry over). The pruned
checkpoints are made once (calibration canterbury, 64 x 512, seed 0) and kept in
benchmarks/work/ (prune_quality.py --keep benchmarks/work leaves them there too); the
artifacts come from the build cache when an identical one exists (the cache verifies
them), so the dense baselines are built once per engine and precision. Results accumulate in benchmarks/results/cpu_targets.json (a rerun
skips measured cells unless --redo). Asserts nothing.

    .venv/bin/python benchmarks/cpu_targets.py [--models M ...] [--targets T ...]
        [--precisions P ...] [--windows 4] [--redo [--fresh]] [--table]

--redo measures a cell again, but the build's measurement cache answers an identical
artifact and workload with what it measured before; --fresh re-times it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, kept_name, pruned_default, run_sparsedeploy

RESULTS = RESULTS_DIR / "cpu_targets.json"
MODELS = {
    "dense": None,
    "wanda-50%": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-70%": ["--method", "wanda", "--sparsity", "0.7"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
}
TARGETS = {"onnxruntime": ("fp32", "int8", "int4"), "deepsparse": ("fp32", "int8")}


def checkpoint_for(model: str) -> str:
    return "default" if MODELS[model] is None else str(pruned_default(kept_name(model), MODELS[model]))


def measure(model: str, target: str, precision: str, windows: int, fresh: bool = False) -> dict:
    quant = "none" if precision == "fp32" else precision
    with tempfile.TemporaryDirectory() as scratch:
        out, seconds = run_sparsedeploy("build", "--target", target, "--model", checkpoint_for(model), "--quant", quant,
                           "-o", str(Path(scratch) / "bundle"), "--windows", str(windows), "--json",
                           *(["--fresh"] if fresh else []))
    if out.returncode not in (0, 1):  # 1: a gate failed, the numbers are still measured
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300], "exit": out.returncode}
    report = json.loads(out.stdout)
    latency, quality = report["latency"], report["quality"]
    return {
        "ppl_target": quality["ppl_target"],
        "ppl_reference": quality["ppl_reference"],
        "ppl_dense_target": quality["ppl_dense"],
        "kl_mean": quality["kl_mean"],
        "top1_agreement": quality["top1_agreement"],
        "prefill_tok_s": latency["sparse"]["prefill_tok_s"],
        "decode_tok_s": latency["sparse"]["decode_tok_s"],
        "dense_prefill_tok_s": latency["dense"]["prefill_tok_s"],
        "dense_decode_tok_s": latency["dense"]["decode_tok_s"],
        "speedup_prefill": latency["speedup"]["prefill"],
        "speedup_decode": latency["speedup"]["decode"],
        "sparse_kernels": latency["sparse_kernels"],
        "artifact_mib": report["artifact"]["bytes"] / 2**20,
        "artifact_sparsity": report["artifact"]["sparsity"],
        "workload": latency["workload"],
        "windows": quality["protocol"]["windows"],
        "passed": report["passed"],
        "wall_s": round(seconds, 1),
        "engine": f"{report['engine']['name']} {report['engine']['version']}",
    }


def print_table(results: dict) -> None:
    print("| model | target | precision | ppl on target (dense) | KL / top-1 vs PyTorch | prefill tok/s (dense) | "
          "decode tok/s (dense) | speedup prefill / decode | sparse kernels | artifact MiB | zeros in artifact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        model, target, precision = key.split("|")
        if "error" in r:
            print(f"| {model} | {target} | {precision} | error: {r['error']} |||||||")
            continue
        print(f"| {model} | {target} | {precision} | {r['ppl_target']:.2f} ({r.get('ppl_dense_target', float('nan')):.2f}) | "
              f"{r['kl_mean']:.3f} / {r['top1_agreement']:.3f} | {r['prefill_tok_s']:.0f} ({r['dense_prefill_tok_s']:.0f}) | "
              f"{r['decode_tok_s']:.1f} ({r['dense_decode_tok_s']:.1f}) | {r['speedup_prefill']:.2f}x / {r['speedup_decode']:.2f}x | "
              f"{r['sparse_kernels']} | {r['artifact_mib']:.0f} | {r['artifact_sparsity']:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "dense"], choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--windows", type=int, default=4, help="quality windows of 1024 tokens per cell")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="re-measure instead of reusing the build cache's measurements")
    parser.add_argument("--table", action="store_true", help="print the saved table and exit")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.table:
        for target in args.targets:
            for precision in TARGETS[target]:
                if precision not in args.precisions:
                    continue
                for model in args.models:
                    key = f"{model}|{target}|{precision}"
                    if key in results and "error" not in results[key] and not args.redo:
                        continue
                    print(f"measuring {key} ...", file=sys.stderr, flush=True)
                    results[key] = measure(model, target, precision, args.windows, args.fresh)
                    RESULTS.parent.mkdir(exist_ok=True)
                    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


if __name__ == "__main__":
    main()
