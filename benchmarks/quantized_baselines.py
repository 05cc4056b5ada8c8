"""Quality of the cuda target's dense quantized baselines (bitsandbytes LLM.int8 and NF4) on
the default model, on the `eval` protocol (wikitext2, 40 windows x 1024 tokens), against
the dense model on the same device: perplexity, KL and top-1 agreement, next to the
pruned rows of prune_quality.py / recovery.py. It is the quality half of what the cuda
target's report puts beside its builds; bitsandbytes has CPU kernels, so it runs here
(speed on a CPU says nothing about a GPU and is not measured).

    .venv/bin/python benchmarks/quantized_baselines.py [--device cpu|cuda] [--windows 40]

Results go to benchmarks/results/quantized_baselines.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR  # noqa: E402
from sparsedeploy.backends.torch_runtime import QUANTIZED_BASELINES, TorchSession, bitsandbytes_missing  # noqa: E402
from sparsedeploy.build.measure import quality_against_reference  # noqa: E402
from sparsedeploy.data.sources import load_text  # noqa: E402
from sparsedeploy.data.windows import evaluation_windows, tokenize  # noqa: E402
from sparsedeploy.models.checkpoint import load_tokenizer, resolve_checkpoint  # noqa: E402

RESULTS = RESULTS_DIR / "quantized_baselines.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=1024)
    args = parser.parse_args()
    missing = bitsandbytes_missing()
    if missing:
        raise SystemExit(missing)
    import bitsandbytes

    checkpoint = resolve_checkpoint("default")
    text = load_text("wikitext2")
    windows = evaluation_windows(tokenize(load_tokenizer(checkpoint), text), args.seqlen, args.windows, text.name)
    # The dense model in the precision the target's build would run: fp16 on a GPU; a CPU
    # runs float32 (bitsandbytes computes NF4 in that dtype, LLM.int8 in fp16 regardless).
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    results = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "bitsandbytes": bitsandbytes.__version__,
               "torch": torch.__version__, "data": text.describe(), "windows": args.windows, "seqlen": args.seqlen, "rows": {}}
    with TorchSession(checkpoint.path, dtype, args.device) as dense:
        for name in QUANTIZED_BASELINES:
            started = time.perf_counter()
            with TorchSession(checkpoint.path, dtype, args.device, baseline=name) as quantized:
                measured = quality_against_reference(quantized, windows, dense.logits, f"{name} vs dense")
            results["rows"][name] = {"ppl": measured["ppl_target"], "ppl_dense": measured["ppl_reference"],
                                     "kl_mean_vs_dense": measured["kl_mean"], "top1_vs_dense": measured["top1_agreement"],
                                     "description": QUANTIZED_BASELINES[name], "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps({name: results["rows"][name]}), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| baseline | ppl | dense ppl | KL vs dense | top-1 vs dense |  ({args.device}, {results['dtype']})")
    print("|---|---|---|---|---|")
    for name, row in results["rows"].items():
        print(f"| {name} | {row['ppl']:.2f} | {row['ppl_dense']:.2f} | {row['kl_mean_vs_dense']:.4f} | {row['top1_vs_dense']:.4f} |")


if __name__ == "__main__":
    main()
