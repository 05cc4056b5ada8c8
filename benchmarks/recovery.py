"""Recovery on the default model: perplexity before and after `sparsedeploy recover`, on
the `eval` protocol of prune_quality.py (wikitext2, 40 windows x 1024 tokens).

Rows: {Wanda, SparseGPT} x {2:4, 50%} and depth-pruned (8 layers dropped). The one-shot
checkpoints are pruned once (calibration canterbury, 64 x 512, seed 0) into
benchmarks/work/ (shared with prune_quality.py --keep and cpu_targets.py); each recovery
runs the real command line and its checkpoint is kept beside them. Results accumulate in
benchmarks/results/recovery.json (a rerun skips measured rows unless --redo). Asserts
nothing; the goals in the issue (2:4 at most 0.6x its one-shot perplexity within 30
minutes on a CPU) are printed next to what was reached.

    .venv/bin/python benchmarks/recovery.py [--rows ROW ...] [--steps N] [--lr LR]
        [--device cpu|cuda] [--redo] [--table]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import EVALUATION, RESULTS_DIR, WORK, kept_name, pruned_default, sparsedeploy_json

RESULTS = RESULTS_DIR / "recovery.json"
ROWS = {
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "wanda-50%": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "depth-drop-8": ["--structured", "depth", "--drop", "8"],
}


def one_shot(row: str, device: str = "cpu") -> tuple[Path, float]:
    path = pruned_default(kept_name(row), ROWS[row], device)
    evaluated, _ = sparsedeploy_json("eval", str(path), *EVALUATION)
    return path, evaluated["ppl"]


def measure(row: str, steps: int, lr: float | None, device: str, batch: int | None = None, seqlen: int | None = None) -> dict:
    pruned, ppl_before = one_shot(row, device)
    shape = f"-{batch}x{seqlen}" if batch or seqlen else ""
    output = WORK / (f"{kept_name(row)}-recovered-{steps}" + (f"-lr{lr:g}" if lr else "") + shape)
    extra = (["--lr", str(lr)] if lr else []) + (["--batch", str(batch)] if batch else []) + (["--seqlen", str(seqlen)] if seqlen else [])
    print(f"recovering {row} ({steps} steps) ...", file=sys.stderr, flush=True)
    document, seconds = sparsedeploy_json("recover", str(pruned), "-o", str(output), "--steps", str(steps),
                                          "--device", device, *extra, "--force")
    evaluated, _ = sparsedeploy_json("eval", str(output), *EVALUATION)
    recovery = document["recovery"]
    return {
        "ppl_one_shot": ppl_before,
        "ppl_recovered": evaluated["ppl"],
        "ratio": evaluated["ppl"] / ppl_before,
        "steps": recovery["steps"],
        "best_step": recovery["best_step"],
        "tokens_seen": recovery["tokens_seen"],
        "heldout_loss_before": recovery["heldout_loss_before"],
        "heldout_loss_after": recovery["heldout_loss_after"],
        "train_loss_first": recovery["train_loss_first"],
        "train_loss_last": recovery["train_loss_last"],
        "lr": recovery["settings"]["lr"],
        "data": recovery["data"]["name"],
        "recover_s": round(seconds, 1),
        "device": device,
        "sparsity": document["measured"]["total_sparsity"],
        "nm_compliance_2of4": document["measured"]["nm_compliance"]["2:4"],
    }


def print_table(results: dict) -> None:
    dense = results.get("dense", {}).get("ppl")
    print(f"dense perplexity: {dense:.2f}" if dense else "dense perplexity: not measured")
    print("| row | one-shot ppl | recovered ppl | recovered / one-shot | x dense | steps (best) | tokens | "
          "held-out KL before -> after | minutes | device | 2:4 compliance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key == "dense":
            continue
        print(f"| {key} | {r['ppl_one_shot']:.2f} | {r['ppl_recovered']:.2f} | {r['ratio']:.2f} | "
              f"{r['ppl_recovered'] / dense:.2f} | {r['steps']} ({r['best_step']}) | {r['tokens_seen']:,} | "
              f"{r['heldout_loss_before']:.3f} -> {r['heldout_loss_after']:.3f} | {r['recover_s'] / 60:.1f} | "
              f"{r['device']} | {r['nm_compliance_2of4']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=None, help="default: recover's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: recover's own")
    parser.add_argument("--seqlen", type=int, default=None, help="default: recover's own")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the saved table and exit")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.table:
        if "dense" not in results:
            dense, _ = sparsedeploy_json("eval", "default", *EVALUATION)
            results["dense"] = {"ppl": dense["ppl"]}
        for row in args.rows:
            key = (f"{row} @ {args.steps} steps" + (f", lr {args.lr:g}" if args.lr else "")
                   + (f", {args.batch or 'default'}x{args.seqlen or 'default'} tokens" if args.batch or args.seqlen else "")
                   + f", {args.device}")
            if key in results and not args.redo:
                continue
            results[key] = measure(row, args.steps, args.lr, args.device, args.batch, args.seqlen)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            print_table(results)
    print_table(results)


if __name__ == "__main__":
    main()
