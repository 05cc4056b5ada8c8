"""The edge path on the default model: GGUF files in llama.cpp, dense and pruned, at the
types people ship.

Rows: dense F16, dense Q8_0, dense Q4_K_M, depth-pruned (4 and 8 layers dropped) Q4_K_M,
width-pruned (1/3 of the KV groups, 25 % of the FFN channels) Q4_K_M, Wanda 2:4 Q4_K_M.
Each row is a real `sparsedeploy build --target gguf` (quality against its own PyTorch
reference, latency against the dense model at the same type, timed side by side); on top,
its KL divergence and top-1 agreement against the DENSE PyTorch model on the same windows.
Speedups are over dense Q4_K_M: measured side by side for the Q4_K_M rows, a ratio of two
runs for F16 and Q8_0. Pruned checkpoints are kept in benchmarks/work/ (shared with the
other benchmarks); results go to benchmarks/results/gguf_edge.json. Asserts nothing.

    .venv/bin/python benchmarks/gguf_edge.py [--rows ROW ...] [--windows 8] [--redo] [--table]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import RESULTS_DIR, WORK, pruned_default, sparsedeploy_json

RESULTS = RESULTS_DIR / "gguf_edge.json"
# row -> (checkpoint under WORK or "default", prune arguments, llama.cpp type)
ROWS = {
    "dense F16": ("default", None, "F16"),
    "dense Q8_0": ("default", None, "Q8_0"),
    "dense Q4_K_M": ("default", None, "Q4_K_M"),
    "depth-drop-4 Q4_K_M": ("depth-drop-4", ["--structured", "depth", "--drop", "4"], "Q4_K_M"),
    "depth-drop-8 Q4_K_M": ("depth-drop-8", ["--structured", "depth", "--drop", "8"], "Q4_K_M"),
    "width Q4_K_M": ("width-h0.33-f0.25", ["--structured", "width", "--heads", "0.34", "--ffn", "0.25"], "Q4_K_M"),
    "wanda-2:4 Q4_K_M": ("wanda-2of4", ["--method", "wanda", "--pattern", "2:4"], "Q4_K_M"),
}
ANCHOR = ("llama.cpp's published figure: a 7B model at Q4_K_M generates about 2.5x faster than at F16; "
          "the edge study this issue cites pairs Q4_K_M with depth pruning")


def checkpoint_for(row: str) -> str:
    name, prune_args, _ = ROWS[row]
    return name if prune_args is None else str(pruned_default(name, prune_args))


def against_dense(bundle: Path, windows: int) -> dict:
    """KL and top-1 of the row's GGUF in llama.cpp against the dense PyTorch model."""
    from sparsedeploy.backends.base import BuiltArtifact, Workload
    from sparsedeploy.backends.llamacpp import LlamaCppBackend
    from sparsedeploy.checks.quality import evaluate, torch_logits_fn
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.data.windows import evaluation_windows, tokenize
    from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    dense = resolve_checkpoint("default")
    text = load_text("wikitext2")
    token_windows = evaluation_windows(tokenize(load_tokenizer(dense), text), 1024, windows, text.name)
    workload = Workload(eval_seqlen=1024, eval_windows=windows, prompt_tokens=512, new_tokens=128, batches=(1,), runs=1,
                        warmup=0, threads=2)
    artifact = BuiltArtifact.from_directory(bundle / "artifact")
    with LlamaCppBackend().load(artifact, workload) as session:
        result = evaluate(session.logits, token_windows, reference=torch_logits_fn(load_model(dense)),
                          description="against the dense model")
    return {"ppl": result.ppl, "kl_vs_dense": result.kl_mean, "top1_vs_dense": result.top1_agreement}


def measure(row: str, windows: int) -> dict:
    checkpoint = checkpoint_for(row)
    gguf_type = ROWS[row][2]
    bundle = WORK / f"gguf-{row.replace(' ', '-').replace(':', 'of')}"
    print(f"building {row} ...", file=sys.stderr, flush=True)
    report, _ = sparsedeploy_json("build", "--target", "gguf", "--model", checkpoint, "--gguf-type", gguf_type,
                                  "--dense", "default", "--windows", str(windows), "-o", str(bundle), "--force", ok=(0, 1))
    latency = report["latency"]
    return {
        "gguf_type": gguf_type,
        "bytes": report["artifact"]["bytes"],
        "parameters": report["checkpoint"]["parameters"],
        "shapes": latency["engine_kernels"]["shapes"],
        "artifact_sparsity": report["artifact"]["sparsity"],
        "ppl_target": report["quality"]["ppl_target"],
        "ppl_reference": report["quality"]["ppl_reference"],
        "kl_vs_own_reference": report["quality"]["kl_mean"],
        **against_dense(bundle, windows),
        "prefill_tok_s": latency["sparse"]["prefill_tok_s"],
        "decode_tok_s": latency["sparse"]["decode_tok_s"],
        "dense_same_type": {"prefill_tok_s": latency["dense"]["prefill_tok_s"], "decode_tok_s": latency["dense"]["decode_tok_s"]},
        "speedup_vs_dense_same_type": latency["speedup"],
        "fallbacks": report["artifact"]["details"]["tensor_types"]["fallbacks"],
        "threads": latency["workload"]["threads"],
        "windows": windows,
    }


def print_table(results: dict) -> None:
    base = results.get("dense Q4_K_M")
    print(ANCHOR)
    print("| row | file MiB | ppl (llama.cpp) | KL / top-1 vs dense | prefill tok/s | decode tok/s | "
          "speedup over dense Q4_K_M, prefill / decode |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        if r["gguf_type"] == "Q4_K_M":
            speed = r["speedup_vs_dense_same_type"]
            speedup = f"{speed['prefill']:.2f}x / {speed['decode']:.2f}x (side by side)"
        elif base:
            speedup = (f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x / {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
                       "(separate runs)")
        else:
            speedup = "n/a"
        print(f"| {row} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.2f} | {r['kl_vs_dense']:.3f} / {r['top1_vs_dense']:.3f} | "
              f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {speedup} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the saved table and exit")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.table:
        for row in args.rows:
            if row in results and not args.redo:
                continue
            results[row] = measure(row, args.windows)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


if __name__ == "__main__":
    main()
