"""Pruning quality on the default model, on the `eval` protocol (wikitext2, 40 windows x
1024 tokens), calibration `canterbury`, 64 windows x 512 tokens, seed 0.

Each row runs the real command line (`sparsedeploy prune ... --json`, then `eval`) in a
subprocess, so its peak RSS is that prune alone. Results accumulate in
benchmarks/results/prune_quality.json (a rerun skips rows already measured unless
--redo) and print as a table. Asserts nothing.

    .venv/bin/python benchmarks/prune_quality.py [--rows ROW ...] [--redo] [--list] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CALIBRATION, EVALUATION, RESULTS_DIR, kept_name, sparsedeploy_json

RESULTS = RESULTS_DIR / "prune_quality.json"

ROWS: dict[str, list[str]] = {
    **{f"{method}-{label}": ["--method", method, *target]
       for label, target in (("50%", ["--sparsity", "0.5"]), ("4:8", ["--pattern", "4:8"]), ("2:4", ["--pattern", "2:4"]))
       for method in ("magnitude", "wanda", "sparsegpt")},
    "wanda-owl-50%": ["--method", "wanda", "--sparsity", "0.5", "--owl"],
    "wanda-owl-70%": ["--method", "wanda", "--sparsity", "0.7", "--owl"],
    "wanda-70%": ["--method", "wanda", "--sparsity", "0.7"],
    "depth-drop-4": ["--structured", "depth", "--drop", "4"],
    "depth-drop-8": ["--structured", "depth", "--drop", "8"],
    "width-heads-1/3-ffn-25%": ["--structured", "width", "--heads", "0.34", "--ffn", "0.25"],
}


def children_peak_rss_mib() -> float:
    """Largest peak RSS of the children reaped so far (a fresh process per row, and read
    right after the prune, so it is that prune's)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(row: str, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        output = keep / kept_name(row) if keep else Path(scratch) / "pruned"
        pruned, prune_s = sparsedeploy_json("prune", "default", "-o", str(output), *ROWS[row], *CALIBRATION, "--force")
        peak_rss = children_peak_rss_mib()
        evaluated, _ = sparsedeploy_json("eval", str(output), *EVALUATION)
    measured = pruned["measured"]
    return {
        "ppl": evaluated["ppl"],
        "sparsity": measured["total_sparsity"],
        "nm_compliance": measured["nm_compliance"],
        "parameters": measured["parameters"],
        "prune_s": round(prune_s, 1),
        "prune_peak_rss_mib": round(peak_rss, 1),
        "args": ROWS[row],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the pruned checkpoints in this directory "
                        "(benchmarks/work is where cpu_targets.py looks)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    if args.child:  # one row in a fresh process, so RUSAGE_CHILDREN is this row's prune alone
        print(json.dumps(measure(args.child, args.keep)))
        return

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if "dense" not in results or args.redo:
        dense, _ = sparsedeploy_json("eval", "default", *EVALUATION)
        results["dense"] = {"ppl": dense["ppl"], "sparsity": 0.0}
    for row in args.rows:
        if row not in ROWS:
            raise SystemExit(f"unknown row '{row}'; --list shows them")
        if row in results and not args.redo:
            continue
        print(f"measuring {row} ...", file=sys.stderr, flush=True)
        keep = ["--keep", str(args.keep.resolve())] if args.keep else []
        out = subprocess.run([sys.executable, __file__, "--child", row, *keep], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{row}: failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        results[row] = json.loads(out.stdout.strip().splitlines()[-1])
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    dense = results["dense"]["ppl"]
    print("| row | perplexity | x dense | sparsity | 2:4 | 4:8 | prune s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        nm = {k: f"{v:.3f}" for k, v in r.get("nm_compliance", {}).items()}
        print(f"| {row} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | {r['sparsity']:.2%} | {nm.get('2:4', '')} | "
              f"{nm.get('4:8', '')} | {r.get('prune_s', '')} | {r.get('prune_peak_rss_mib', '')} |")


if __name__ == "__main__":
    main()
