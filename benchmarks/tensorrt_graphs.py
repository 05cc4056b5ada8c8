"""What the tensorrt target hands TensorRT, measured without TensorRT: the graphs
`prepare_graphs` writes for fp16 (float16), int8 and fp8 (float16 + Q/DQ), run in ONNX
Runtime on the CPU against the float32 PyTorch model of the same checkpoint, on
WikiText-2 windows (perplexity, KL divergence, top-1 agreement).

This is the quality of the graph, not of an engine: TensorRT's kernels accumulate and
fuse differently (and FP8 runs natively there, emulated here). It shows whether the
float16 export and the Q/DQ placement keep the model, on the real default model, before
any GPU is involved. Calibration for int8 / fp8 is the tensorrt profile's (Canterbury,
16 x 256, seed 0), never the evaluation text. Asserts nothing.

    .venv/bin/python benchmarks/tensorrt_graphs.py [--models dense wanda-2:4]
        [--precisions fp16 int8 fp8] [--windows 8] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, kept_name, pruned_default

RESULTS = RESULTS_DIR / "tensorrt_graphs.json"
MODELS = {"dense": None, "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"]}


def ort_logits_fn(graph: Path):
    """Every position's logits of one window through the exported graph (empty past)."""
    import onnxruntime as ort

    from sparsedeploy.export.onnx_decoder import past_dtype

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    past = [value for value in session.get_inputs() if value.name.startswith("past_key_values.")]
    dtype = past_dtype(session)

    def logits(window: torch.Tensor) -> torch.Tensor:
        length = window.shape[0]
        feeds = {"input_ids": window[None].numpy().astype(np.int64), "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length, dtype=np.int64)[None]}
        for value in past:
            feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), dtype)
        (out,) = session.run(["logits"], feeds)
        return torch.from_numpy(out[0].astype(np.float32))

    return logits


def measure(model_name: str, precisions: list[str], windows: int, seqlen: int) -> dict:
    from sparsedeploy.backends.base import calibration_settings
    from sparsedeploy.build.pipeline import calibration_loader, calibration_text
    from sparsedeploy.checks.quality import evaluate, torch_logits_fn
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.data.windows import evaluation_windows, tokenize
    from sparsedeploy.export import tensorrt_engine as stages
    from sparsedeploy.export.smoothing import smoothquant_alpha
    from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from sparsedeploy.targets import parse_profile

    spec = "default" if MODELS[model_name] is None else str(pruned_default(kept_name(model_name), MODELS[model_name]))
    checkpoint = resolve_checkpoint(spec)
    model = load_model(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    evaluation = load_text("wikitext2")
    eval_windows = evaluation_windows(tokenize(tokenizer, evaluation), seqlen, windows, evaluation.name)
    profile = parse_profile(Path(__file__).parent.parent / "targets" / "tensorrt.toml")
    calibration_spec = calibration_settings(profile.raw.get("build", {}))
    calibration = calibration_loader(calibration_spec, calibration_text(calibration_spec, evaluation), tokenizer)
    reference = torch_logits_fn(model)
    rows = {}
    for precision in precisions:
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            prepared = stages.prepare_graphs(model, Path(scratch) / precision, precision,
                                             stages.graph_opset(precision, None), calibration,
                                             smoothquant_alpha(profile.raw.get("build", {}).get("smoothquant_alpha")))
            prepare_seconds = time.perf_counter() - started
            result = evaluate(ort_logits_fn(prepared.full), eval_windows, reference, f"{model_name} {precision}")
        rows[precision] = {
            "ppl_graph": round(result.ppl, 4), "ppl_torch_fp32": round(result.ppl_reference, 4),
            "ppl_delta_pct": round(100 * (result.ppl / result.ppl_reference - 1), 3),
            "kl_mean": round(result.kl_mean, 6), "top1_agreement": round(result.top1_agreement, 4),
            "export_max_abs_diff_vs_torch_fp32": prepared.export["max_abs_diff_vs_torch_fp32"],
            "two_four_along_k": prepared.orientation["two_four_along_k"], "linear_weights": prepared.orientation["weights"],
            "linears_quantized": (prepared.quantization or {}).get("linears_quantized", 0),
            "prepare_seconds": round(prepare_seconds, 1),
        }
        print(f"{model_name:10s} {precision:5s} ppl {result.ppl:8.3f} (torch fp32 {result.ppl_reference:8.3f}, "
              f"{rows[precision]['ppl_delta_pct']:+.2f} %)  KL {result.kl_mean:.5f}  top-1 {result.top1_agreement:.4f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp16", "int8", "fp8"], choices=["fp16", "int8", "fp8"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    import onnxruntime

    results = {
        "what": "tensorrt target's ONNX graphs (float16; Q/DQ int8 / fp8) in ONNX Runtime CPU vs float32 PyTorch",
        "evaluation": {"data": "wikitext2", "windows": args.windows, "seqlen": args.seqlen},
        "machine": {"cpu": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__},
        "models": {name: measure(name, args.precisions, args.windows, args.seqlen) for name in args.models},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
