"""report.json (for pipelines), report.md and latency.png (for people), and the gates.

The one question the report must answer plainly: did sparsity make this engine faster?
``sparse_kernels`` is "used" only when the engine says so, or when a speedup at equal
precision and equal shapes is measured that dense kernels cannot explain.
"""

from __future__ import annotations

from pathlib import Path

SCHEMA = "sparsedeploy.report/1"
PLOT_FILE = "latency.png"
# A speedup this large at equal precision and shapes is beyond run-to-run noise here.
UNEXPLAINED_SPEEDUP = 1.15
MIN_SPARSITY_FOR_KERNELS = 0.2

GATE_KEYS = {
    # profile key -> (report value getter, comparison)
    "max_ppl_delta_pct": (lambda r: r["quality"]["delta_pct"], "max"),
    "max_kl_mean": (lambda r: r["quality"]["kl_mean"], "max"),
    "min_top1_agreement": (lambda r: r["quality"]["top1_agreement"], "min"),
    "min_prefill_speedup": (lambda r: r["latency"]["speedup"]["prefill"], "min"),
    "min_decode_speedup": (lambda r: r["latency"]["speedup"]["decode"], "min"),
}


def gates_for(profile_gates: dict, precision: str) -> dict:
    """The profile's [gates], with [gates.<precision>] overriding them."""
    gates = {key: value for key, value in profile_gates.items() if not isinstance(value, dict)}
    gates.update(profile_gates.get(precision, {}))
    return gates


LATENCY_GATES = ("min_prefill_speedup", "min_decode_speedup")


def evaluate_gates(report: dict, gates: dict) -> list[dict]:
    """Each known gate of the profile against the report. Speedup gates do not apply when
    the checkpoint is its own dense baseline (a ratio of 1 plus noise would decide)."""
    same_model = report["checkpoint"]["sha256"] == report["checkpoint"]["dense_source"]["sha256"]
    results = []
    for name, limit in gates.items():
        if name not in GATE_KEYS or (same_model and name in LATENCY_GATES):
            continue
        getter, kind = GATE_KEYS[name]
        value = getter(report)
        passed = value <= limit if kind == "max" else value >= limit
        results.append({"name": name, "limit": limit, "value": value, "passed": bool(passed)})
    return results


def judge_sparse_kernels(engine_claim: dict, speedup: dict, artifact_sparsity: float, same_shapes: bool) -> tuple[str, str]:
    """"used" / "not-used" / "unknown" and the evidence, in words."""
    claim = engine_claim.get("sparse_kernels", "unknown")
    evidence = engine_claim.get("evidence", "")
    best = max(speedup["prefill"], speedup["decode"])
    measured = f"measured speedup over the dense build: prefill {speedup['prefill']:.2f}x, decode {speedup['decode']:.2f}x"
    if artifact_sparsity < MIN_SPARSITY_FOR_KERNELS:
        if same_shapes:
            return "not-used", f"the artifact's linear weights are {artifact_sparsity:.1%} zeros: nothing for sparse kernels to skip; {measured}"
        return "not-used", f"structured pruning: the model is smaller, not sparse ({artifact_sparsity:.1%} zeros); {measured}"
    if claim in ("used", "not-used"):
        return claim, f"{evidence}; {measured}"
    if same_shapes and best >= UNEXPLAINED_SPEEDUP:
        return "used", (f"{measured} at equal precision and equal tensor shapes, which dense kernels cannot explain "
                        f"(engine: {evidence or 'no report'})")
    return claim, f"{evidence or 'the engine does not report its kernels'}; {measured}"


def verdict(report: dict) -> str:
    """One plain sentence on speed, for the top of report.md and the console."""
    latency = report["latency"]
    speedup = latency["speedup"]
    kernels = latency["sparse_kernels"]
    faster = max(speedup["prefill"], speedup["decode"])
    if kernels == "used":
        phases = {phase: _compared(speedup[phase]) for phase in ("prefill", "decode")}
        said = ", ".join(f"{phase} {speedup[phase]:.2f}x ({phases[phase]})" for phase in ("prefill", "decode"))
        if all(word != "faster" for word in phases.values()):
            return f"Sparse kernels ran but gained nothing over the dense build: {said}."
        return f"Sparse kernels ran: {said} against the dense build."
    if faster >= UNEXPLAINED_SPEEDUP:
        return (f"Faster than dense (prefill {speedup['prefill']:.2f}x, decode {speedup['decode']:.2f}x), "
                "but not from sparse kernels: " + latency["evidence"].split(";")[0] + ".")
    state = {"not-used": "not used", "unknown": "not shown to run"}.get(kernels, kernels)
    return (f"No speedup from sparsity on this engine: prefill {speedup['prefill']:.2f}x, decode {speedup['decode']:.2f}x "
            f"the dense build; sparse kernels {state}.")


# Ratios this close to 1 are within run-to-run noise on a shared CPU.
SAME_SPEED_BAND = 0.03


def _compared(ratio: float) -> str:
    if ratio > 1 + SAME_SPEED_BAND:
        return "faster"
    if ratio < 1 - SAME_SPEED_BAND:
        return "slower"
    return "no faster"


def plot_latency(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["latency"]["by_batch"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, (key, title) in zip(axes, (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode"))):
        labels = [f"batch {row['batch']}" for row in rows]
        positions = range(len(rows))
        width = 0.38
        dense = [row["dense"][key] for row in rows]
        sparse = [row["sparse"][key] for row in rows]
        axis.bar([p - width / 2 for p in positions], dense, width, label="dense build", color="#9a9a9a")
        bars = axis.bar([p + width / 2 for p in positions], sparse, width, label="pruned build", color="#2b7bb9")
        for bar, row in zip(bars, rows):
            axis.annotate(f"{row['speedup'][title]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axis.set_xticks(list(positions), labels)
        axis.set_ylabel("tokens / s")
        axis.set_title(f"{title} ({report['engine']['name']}, {report['precision']})")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _tensor_type_lines(details: dict) -> list[str]:
    """A block-quantized artifact (GGUF): the types its tensors hold, and where the engine
    stored a tensor in another type than the one asked for."""
    types = details.get("tensor_types")
    if not types:
        return []
    counts = ", ".join(f"{count} {name}" for name, count in sorted(types["counts"].items(), key=lambda item: -item[1]))
    lines = [f"- Tensor types (asked {types['requested']}): {counts}"]
    for fallback in types.get("fallbacks", []):
        lines.append(f"  - {fallback['tensors']} tensors stored as {fallback['type']}: {fallback['reason']} "
                     f"(e.g. `{fallback['examples'][0]}`)")
    return lines


def _kernel_plan_lines(engine_kernels: dict) -> list[str]:
    """A per-layer kernel plan (the cuda target): which kernel each layer runs at each token
    count and the timed dense/2:4 ratio, layers of one shape and choice on one row."""
    layers = [layer for layer in engine_kernels.get("layers", []) if "kernels" in layer]
    if not layers:
        return []
    token_counts = sorted({int(t) for layer in layers for t in layer["kernels"]})
    groups: dict[tuple, list[dict]] = {}
    for layer in layers:
        key = (tuple(layer["shape"]), tuple(layer["kernels"].get(str(t)) for t in token_counts), layer.get("reason", ""))
        groups.setdefault(key, []).append(layer)
    lines = ["", "### Kernel plan", "",
             "Per layer and token count: the kernel that runs, and the timed dense / 2:4 ratio (above 1: 2:4 faster). "
             "Layers of one shape and choice share a row.", "",
             "| layers | shape | " + " | ".join(f"{t} tok" for t in token_counts) + " |",
             "|---|---|" + "---|" * len(token_counts)]
    for (shape, _, reason), members in groups.items():
        ratios = {timing["tokens"]: timing["ratio"] for timing in members[0].get("timings", [])}
        cells = []
        for tokens in token_counts:
            kernel = members[0]["kernels"].get(str(tokens), "-")
            ratio = ratios.get(tokens)
            cells.append(f"{'2:4' if kernel == 'sparse' else kernel}" + (f" ({ratio:.2f}x)" if ratio else ""))
        names = members[0]["name"] + (f" and {len(members) - 1} more" if len(members) > 1 else "")
        lines.append(f"| {names}{' (' + reason + ')' if reason else ''} | {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
    return lines


def _baseline_lines(report: dict) -> list[str]:
    """Other ways to shrink the dense model (bitsandbytes int8 / NF4 on the cuda target),
    beside the dense and the pruned build, at the first batch size."""
    baselines = report.get("baselines")
    if not baselines:
        return []
    quality, latency = report["quality"], report["latency"]
    lines = ["", "## Dense quantized baselines", "",
             f"The dense build quantized instead of pruned, on the same engine; not gated. KL and top-1 against the dense "
             f"build on the same windows; speed at batch {latency['workload']['batch']}, each timed alternately with the "
             "dense build (ratios above 1: faster than dense).", "",
             "| build | perplexity | KL vs dense | top-1 vs dense | prefill tok/s | decode tok/s | vs dense: prefill / decode |",
             "|---|---|---|---|---|---|---|",
             f"| dense build ({report['precision']}) | {_fmt(quality['ppl_dense'], 3)} | 0 | 1 | {latency['dense']['prefill_tok_s']:.1f} "
             f"| {latency['dense']['decode_tok_s']:.1f} | 1.00x / 1.00x |",
             f"| pruned build ({report['checkpoint']['pattern']}, {report['precision']}) | {_fmt(quality['ppl_target'], 3)} | - | - "
             f"| {latency['sparse']['prefill_tok_s']:.1f} | {latency['sparse']['decode_tok_s']:.1f} "
             f"| {latency['speedup']['prefill']:.2f}x / {latency['speedup']['decode']:.2f}x |"]
    builds_graphed = latency.get("engine_kernels", {}).get("cuda_graphs") is True
    for baseline in baselines:
        if "skipped" in baseline:
            lines.append(f"| {baseline['name']} | skipped: {baseline['skipped']} | | | | | |")
            continue
        measured, row = baseline["quality"], baseline["latency"]["by_batch"][0]
        # Said where the builds ran as CUDA graphs and this baseline could not be captured.
        eager = builds_graphed and baseline.get("engine_kernels", {}).get("cuda_graphs") is False
        lines.append(f"| {baseline['name']}{' (eager: no CUDA graphs)' if eager else ''} | {_fmt(measured['ppl'], 3)} "
                     f"| {_fmt(measured['kl_mean_vs_dense'], 5)} | {_fmt(measured['top1_vs_dense'], 4)} "
                     f"| {row['baseline']['prefill_tok_s']:.1f} | {row['baseline']['decode_tok_s']:.1f} "
                     f"| {row['speedup']['prefill']:.2f}x / {row['speedup']['decode']:.2f}x |")
    lines += [""] + [f"- {b['name']}: {b['description']}" + (f"; {b['engine_kernels']['evidence']}" if "engine_kernels" in b else "")
                     for b in baselines]
    return lines


def _calibration_lines(calibration: dict | None) -> list[str]:
    """Which text a calibrating build (smoothing, static INT8, GPTQ) read: never the evaluation text."""
    if calibration is None:
        return []
    return [f"- Calibrated on `{calibration['name']}` (sha256 {calibration['sha256'][:12]}), "
            f"{calibration['nsamples']} windows x {calibration['seqlen']} tokens, seed {calibration['seed']}"]


def render_markdown(report: dict) -> str:
    quality, latency, workload = report["quality"], report["latency"], report["latency"]["workload"]
    checkpoint, artifact = report["checkpoint"], report["artifact"]
    lines = [
        f"# sparsedeploy build: {report['target']} ({report['precision']})",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}.** {verdict(report)}",
        "",
        f"- Engine: {report['engine']['name']} {report['engine']['version']} on {report['engine']['device']}",
        f"- Checkpoint: `{checkpoint['path']}` (sha256 {checkpoint['sha256'][:12]}), pattern {checkpoint['pattern']}, "
        f"sparsity {checkpoint['sparsity']:.2%}, 2:4 compliance {checkpoint['nm_compliance']['2:4']:.3f}",
        f"- Artifact: `{artifact['path']}`, {artifact['bytes'] / 2**20:.1f} MiB, sparsity measured in the artifact "
        f"{artifact['sparsity']:.2%}, 2:4 compliance {artifact['nm_compliance']['2:4']:.3f}",
        f"- Dense baseline: the source checkpoint built by the same backend at {report['precision']}",
        *_calibration_lines(artifact.get("calibration")),
        *_tensor_type_lines(artifact.get("details", {})),
        "",
        "## Gates",
        "",
        "| gate | limit | value | result |",
        "|---|---|---|---|",
    ]
    for gate in report["gates"]:
        lines.append(f"| {gate['name']} | {gate['limit']} | {_fmt(gate['value'], 4)} | {'pass' if gate['passed'] else '**FAIL**'} |")
    protocol = quality["protocol"]
    lines += [
        "",
        "## Quality",
        "",
        f"{protocol['data']['name']}, {protocol['windows']} windows x {protocol['seqlen']} tokens "
        f"({protocol['tokens']} predicted tokens), each window from an empty context.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| perplexity on target | {_fmt(quality['ppl_target'], 4)} |",
        f"| perplexity, PyTorch reference of the same checkpoint | {_fmt(quality['ppl_reference'], 4)} |",
        f"| perplexity, dense source on target | {_fmt(quality['ppl_dense'], 4)} |",
        f"| target vs reference | {quality['delta_pct']:+.3f} % |",
        f"| KL(reference \\|\\| target), mean per token | {_fmt(quality['kl_mean'], 5)} |",
        f"| top-1 agreement with reference | {_fmt(quality['top1_agreement'], 4)} |",
        "",
        "## Latency",
        "",
        f"Prompt {workload['prompt_tokens']} tokens, {workload['new_tokens']} new tokens with the KV cache, "
        f"{workload['runs']} timed runs after {workload.get('warmup', 0)} warm-up, {workload.get('threads', '?')} threads, "
        "sparse and dense alternated run by run.",
        "",
        "| batch | build | prefill tok/s | prefill ms p50 / p95 | decode tok/s | decode ms/step p50 / p95 |",
        "|---|---|---|---|---|---|",
    ]
    for row in latency["by_batch"]:
        for name in ("sparse", "dense"):
            m = row[name]
            lines.append(
                f"| {row['batch']} | {name} | {m['prefill_tok_s']:.1f} | {m['prefill_ms_p50']:.1f} / {m['prefill_ms_p95']:.1f} | "
                f"{m['decode_tok_s']:.1f} | {m['decode_ms_p50']:.2f} / {m['decode_ms_p95']:.2f} |"
            )
        lines.append(f"| {row['batch']} | speedup | {row['speedup']['prefill']:.2f}x | | {row['speedup']['decode']:.2f}x | |")
    lines += [
        "",
        f"Sparse kernels: **{latency['sparse_kernels']}**. {latency['evidence']}",
        *_kernel_plan_lines(latency.get("engine_kernels", {})),
        *_baseline_lines(report),
        "",
        f"![sparse vs dense latency]({PLOT_FILE})",
        "",
    ]
    if report.get("cached_measurements"):
        lines += [f"_Measurements reused from the cache (measured {report['cached_measurements']}); "
                  "`sparsedeploy check` on this bundle re-measures._", ""]
    return "\n".join(lines)
