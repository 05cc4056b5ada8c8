"""Speed of the foundation on the default model: cache hit, model load, and `eval`
throughput next to transformers' own loss on the same windows (the baseline run side
by side, since machines are noisy). Prints measured numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_eval.py [--windows 4] [--seqlen 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsedeploy.checks.quality import evaluate, torch_logits_fn
from sparsedeploy.data.sources import load_text
from sparsedeploy.data.windows import evaluation_windows, tokenize
from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=1024)
    args = parser.parse_args()

    checkpoint, resolve_s = timed(lambda: resolve_checkpoint("default"))
    tokenizer, tokenizer_s = timed(lambda: load_tokenizer(checkpoint))
    ids, tokenize_s = timed(lambda: tokenize(tokenizer, load_text("wikitext2")))
    model, load_s = timed(lambda: load_model(checkpoint))
    windows = evaluation_windows(ids, args.seqlen, args.windows)

    ours, ours_s = timed(lambda: evaluate(torch_logits_fn(model), windows))

    def transformers_loss():
        with torch.no_grad():
            return [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]

    losses, baseline_s = timed(transformers_loss)
    tokens = ours.tokens
    results = {
        "threads": torch.get_num_threads(),
        "resolve_default_s": round(resolve_s, 3),
        "load_tokenizer_s": round(tokenizer_s, 3),
        "tokenize_wikitext2_s": round(tokenize_s, 3),
        "load_model_s": round(load_s, 3),
        "windows": args.windows,
        "seqlen": args.seqlen,
        "eval_tok_s": round(tokens / ours_s, 1),
        "transformers_loss_tok_s": round(tokens / baseline_s, 1),
        "eval_time_vs_transformers_loss": round(ours_s / baseline_s, 3),
        "ppl": ours.ppl,
        "ppl_from_transformers_loss": float(torch.tensor(losses).mean().exp()),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
