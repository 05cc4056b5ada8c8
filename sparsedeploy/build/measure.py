"""The on-target check's two measurements: quality of the engine's logits against the
PyTorch reference, and prefill/decode latency of the sparse build against the dense one.
"""

from __future__ import annotations

import statistics

from sparsedeploy.backends.base import LatencySamples, Session, Workload
from sparsedeploy.checks.quality import LogitsFn, evaluate
from sparsedeploy.ui import progress_iter


def quality_against_reference(session: Session, windows, reference: LogitsFn, label: str) -> dict:
    result = evaluate(session.logits, windows, reference=reference, description=f"quality {label}")
    return {
        "ppl_target": result.ppl,
        "ppl_reference": result.ppl_reference,
        "kl_mean": result.kl_mean,
        "top1_agreement": result.top1_agreement,
        "tokens": result.tokens,
    }


def engine_perplexity(session: Session, windows, label: str) -> dict:
    result = evaluate(session.logits, windows, description=f"quality {label}")
    return {"ppl": result.ppl, "tokens": result.tokens}


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of a small sample (p50 is the median)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(samples: LatencySamples, batch: int, prompt_tokens: int) -> dict:
    prefill_p50 = statistics.median(samples.prefill_ms)
    decode_p50 = statistics.median(samples.decode_ms)
    return {
        "prefill_tok_s": batch * prompt_tokens * 1000 / prefill_p50,
        "decode_tok_s": batch * 1000 / decode_p50,
        "prefill_ms_p50": prefill_p50,
        "prefill_ms_p95": percentile(samples.prefill_ms, 0.95),
        "decode_ms_p50": decode_p50,
        "decode_ms_p95": percentile(samples.decode_ms, 0.95),
        "prefill_ms_runs": [round(v, 3) for v in samples.prefill_ms],
        "decode_ms_runs": [round(v, 3) for v in samples.decode_ms],
    }


def latency_side_by_side(candidate: Session, dense: Session, workload: Workload, name: str = "sparse") -> list[dict]:
    """Per batch size: the candidate build (``name``) and the dense one timed alternately,
    one run at a time, so that a machine that slows down mid-measurement slows both alike."""
    rows = []
    for batch in workload.batches:
        collected = {name: LatencySamples([], []), "dense": LatencySamples([], [])}
        for run in progress_iter(range(workload.runs), f"latency, batch {batch}, {name} and dense", total=workload.runs):
            for label, session in ((name, candidate), ("dense", dense)):
                # The first run of each session carries the warm-up.
                samples = session.measure_latency(batch, workload.prompt_tokens, workload.new_tokens, 1, workload.warmup if run == 0 else 0)
                collected[label].prefill_ms += samples.prefill_ms
                collected[label].decode_ms += samples.decode_ms
        summary = {label: latency_summary(samples, batch, workload.prompt_tokens) for label, samples in collected.items()}
        speedup = {
            "prefill": summary["dense"]["prefill_ms_p50"] / summary[name]["prefill_ms_p50"],
            "decode": summary["dense"]["decode_ms_p50"] / summary[name]["decode_ms_p50"],
        }
        rows.append({"batch": batch, **summary, "speedup": speedup})
    return rows


def baseline_measurements(baseline: Session, dense: Session, windows, workload: Workload, name: str) -> dict:
    """A dense quantized baseline against the dense build on the same engine: its
    perplexity, KL and top-1 agreement against the dense build's logits, and its latency
    alternated with the dense build's (``speedup`` above 1: the baseline is faster)."""
    quality = quality_against_reference(baseline, windows, dense.logits, f"{name} vs the dense build")
    rows = latency_side_by_side(baseline, dense, workload, name="baseline")
    return {
        "quality": {"ppl": quality["ppl_target"], "ppl_dense": quality["ppl_reference"],
                    "kl_mean_vs_dense": quality["kl_mean"], "top1_vs_dense": quality["top1_agreement"]},
        "latency": {"by_batch": [{"batch": row["batch"], "baseline": without_runs(row["baseline"]),
                                  "dense": without_runs(row["dense"]), "speedup": row["speedup"]} for row in rows]},
    }


def without_runs(summary: dict) -> dict:
    """A latency summary without its per-run lists (the report keeps those only once)."""
    return {key: value for key, value in summary.items() if not key.endswith("_runs")}
