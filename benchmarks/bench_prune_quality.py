"""Quality of each pruning method on the default model, on the `eval` protocol
(wikitext2, 40 windows x 1024 tokens by default), with calibration on `canterbury`.
Prints perplexity per method and pattern next to the dense model's. Asserts nothing.

    .venv/bin/python benchmarks/bench_prune_quality.py [--methods magnitude wanda sparsegpt]
        [--targets 2:4 0.5] [--nsamples 64] [--seqlen 512] [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sparsedeploy.checks.quality import evaluate, torch_logits_fn
from sparsedeploy.data.sources import load_text
from sparsedeploy.data.windows import evaluation_windows, tokenize
from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from sparsedeploy.prune.methods import SparsityTarget, get_method
from sparsedeploy.prune.patterns import parse_nm
from sparsedeploy.prune.run import Calibration, PruneRequest, prune_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--targets", nargs="+", default=["2:4", "0.5"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    args = parser.parse_args()

    checkpoint = resolve_checkpoint("default")
    tokenizer = load_tokenizer(checkpoint)
    windows = evaluation_windows(tokenize(tokenizer, load_text("wikitext2")), args.eval_seqlen, args.windows)
    dense = evaluate(torch_logits_fn(load_model(checkpoint)), windows).ppl
    print(json.dumps({"model": "default", "method": "dense", "ppl": round(dense, 3)}), flush=True)
    for target_text in args.targets:
        target = SparsityTarget(pattern=parse_nm(target_text)) if ":" in target_text else SparsityTarget(sparsity=float(target_text))
        for method in args.methods:
            with tempfile.TemporaryDirectory() as scratch:
                output = Path(scratch) / "pruned"
                started = time.perf_counter()
                prune_checkpoint(PruneRequest(checkpoint, output, get_method(method), target,
                                              Calibration("canterbury", args.nsamples, args.seqlen, 0)))
                prune_s = time.perf_counter() - started
                ppl = evaluate(torch_logits_fn(load_model(resolve_checkpoint(str(output)))), windows).ppl
            print(json.dumps({"method": method, "target": target.label if target.pattern else target.sparsity,
                              "ppl": round(ppl, 3), "ppl_vs_dense": round(ppl / dense, 3),
                              "prune_s": round(prune_s, 1), "calibration": f"{args.nsamples}x{args.seqlen} canterbury"}), flush=True)


if __name__ == "__main__":
    main()
