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


def latency_side_by_side(sparse: Session, dense: Session, workload: Workload) -> list[dict]:
    """Per batch size: sparse and dense timed alternately, one run at a time, so that a
    machine that slows down mid-measurement slows both alike."""
    rows = []
    for batch in workload.batches:
        collected = {"sparse": LatencySamples([], []), "dense": LatencySamples([], [])}
        for run in progress_iter(range(workload.runs), f"latency, batch {batch}, sparse and dense", total=workload.runs):
            for name, session in (("sparse", sparse), ("dense", dense)):
                # The first run of each session carries the warm-up.
                samples = session.measure_latency(batch, workload.prompt_tokens, workload.new_tokens, 1, workload.warmup if run == 0 else 0)
                collected[name].prefill_ms += samples.prefill_ms
                collected[name].decode_ms += samples.decode_ms
        summary = {name: latency_summary(samples, batch, workload.prompt_tokens) for name, samples in collected.items()}
        speedup = {
            "prefill": summary["dense"]["prefill_ms_p50"] / summary["sparse"]["prefill_ms_p50"],
            "decode": summary["dense"]["decode_ms_p50"] / summary["sparse"]["decode_ms_p50"],
        }
        rows.append({"batch": batch, **summary, "speedup": speedup})
    return rows
