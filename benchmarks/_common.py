"""What the benchmark scripts share: the protocols, running the command line, and where
pruned checkpoints of the default model are kept between scripts (benchmarks/work/)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
WORK = HERE / "work"
RESULTS_DIR = HERE / "results"
# Calibration is never the evaluation text (Canterbury vs WikiText-2).
CALIBRATION = ["--calib", "canterbury", "--nsamples", "64", "--seqlen", "512", "--seed", "0"]
EVALUATION = ["--data", "wikitext2", "--seqlen", "1024", "--windows", "40"]


def run_sparsedeploy(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m sparsedeploy ARGS` in a fresh process (its peak RSS is its own); the
    finished process and its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sparsedeploy", *args], capture_output=True, text=True)
    return done, time.perf_counter() - started


def sparsedeploy_json(*args: str, ok: tuple[int, ...] = (0,)) -> tuple[dict, float]:
    """`sparsedeploy ARGS --json`: its JSON and wall seconds. An exit code outside ``ok``
    (``build`` exits 1 when a gate fails, with the report still printed) stops the
    benchmark with the command's last words."""
    done, seconds = run_sparsedeploy(*args, "--json")
    if done.returncode not in ok:
        raise SystemExit(f"sparsedeploy {' '.join(args[:4])} ... failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout), seconds


def kept_name(row: str) -> str:
    """The directory name under WORK a pruned checkpoint of ``row`` gets, in every script."""
    return row.replace(":", "of").replace("%", "pct").replace("/", "-")


def pruned_default(name: str, prune_args: list[str], device: str = "cpu") -> Path:
    """The default model pruned with ``prune_args`` (canterbury calibration) under
    WORK/name, pruned once and reused."""
    path = WORK / name
    if not (path / "sparsity.json").is_file():
        print(f"pruning {name} ...", file=sys.stderr, flush=True)
        sparsedeploy_json("prune", "default", "-o", str(path), *prune_args, *CALIBRATION, "--device", device, "--force")
    return path
