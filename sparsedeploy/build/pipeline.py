"""`build` and `check`: the stages every target shares.

build:  load and verify the checkpoint -> find its dense source -> build both with the
        target's backend (quantizing on the way; cached by content) -> on-target check
        (quality vs the PyTorch reference, latency vs the dense build) -> bundle.
check:  verify a bundle's manifest -> re-run the same on-target check from the bundle
        alone -> compare with the bundle's report.

Nothing here names a target: the profile says which backend, the registry supplies it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sparsedeploy import __version__
from sparsedeploy.atomic import check_output_dir, staged_directory
from sparsedeploy.backends.base import Backend, BuildInputs, BuiltArtifact, Workload, get_backend
from sparsedeploy.build import bundle as bundles
from sparsedeploy.build import cache
from sparsedeploy.build.measure import (
    baseline_measurements,
    engine_perplexity,
    latency_side_by_side,
    quality_against_reference,
    without_runs,
)
from sparsedeploy.build.report import (
    PLOT_FILE,
    SCHEMA,
    evaluate_gates,
    gates_for,
    judge_sparse_kernels,
    plot_latency,
    render_markdown,
)
from sparsedeploy.errors import BadInput, TargetUnavailable
from sparsedeploy.models.checkpoint import Checkpoint, checkpoint_sha256, recorded_source, resolve_checkpoint
from sparsedeploy.models.inspection import SPARSITY_FILE, recorded_sparsity
from sparsedeploy.targets import TargetProfile, load_profile
from sparsedeploy.ui import info

QUANT_CHOICES = ("none", "int8", "int4", "fp8")  # fp8: tensorrt on sm_89+
# Patterns a checkpoint satisfies, strictest first: a 2:4 checkpoint is also 4:8 and
# unstructured-sparse, so a profile accepting any of those accepts it.
COMPATIBLE_PATTERNS = {
    "2:4": ("2:4", "4:8", "unstructured"),
    "4:8": ("4:8", "unstructured"),
    "unstructured": ("unstructured",),
    "dense": ("dense",),
    "structured": ("structured",),
}
# `check` reproduces a build when the engine's quality numbers agree this closely.
REPRODUCE_PPL_REL, REPRODUCE_KL_ABS, REPRODUCE_TOP1_ABS = 1e-3, 1e-4, 2e-3


@dataclass
class BuildRequest:
    target: str
    model: str = "default"
    quant: str = "none"
    output: Path | None = None
    force: bool = False
    dense: str | None = None  # the unpruned source; default: sparsity.json's source
    windows: int | None = None  # overrides the profile's quality windows
    runs: int | None = None  # overrides the profile's timed runs
    fresh: bool = False  # re-measure instead of reusing cached measurements
    gguf_type: str | None = None  # a llama.cpp type for the gguf target (Q4_K_M, Q8_0, ...)
    calib: str | None = None  # overrides the profile's calibration text ([build] calib)


# -- stage helpers ------------------------------------------------------------------


def available_backend(profile: TargetProfile) -> Backend:
    backend = get_backend(profile.backend)
    availability = backend.availability()
    if not availability.available:
        raise TargetUnavailable(f"target '{profile.name}' cannot run here: {availability.reason}")
    return backend


def choose_precision(profile: TargetProfile, quant: str, implied: str | None = None) -> str:
    """--quant's precision; with --quant none, what the backend options imply (a llama.cpp
    type), else the profile's default."""
    if quant not in QUANT_CHOICES:
        raise BadInput(f"--quant {quant} is not one of {', '.join(QUANT_CHOICES)}")
    precision = (implied or profile.precision) if quant == "none" else quant
    if precision not in profile.precisions:
        others = [p for p in profile.precisions if p != profile.precision]
        raise BadInput(
            f"target '{profile.name}' does not build {precision} (it builds {', '.join(profile.precisions)}); "
            f"use --quant none{''.join(' or ' + p for p in others)}" + (", or --target onnxruntime for int4" if precision == "int4" else "")
        )
    return precision


def build_options(profile: TargetProfile, backend: Backend, request: BuildRequest) -> dict:
    """The profile's [build] table, with what the command line adds to it."""
    options = dict(profile.raw.get("build", {}))
    if request.calib is not None:
        options["calib"] = request.calib
    if request.gguf_type is not None:
        if "gguf_type" not in backend.command_line_options:
            raise BadInput(f"--gguf-type is for the gguf target (llama.cpp), not '{profile.name}'; drop it or use --target gguf")
        options["gguf_type"] = request.gguf_type
    return options


def workload_for(profile: TargetProfile, windows: int | None = None, runs: int | None = None) -> Workload:
    quality = profile.check.get("quality", {})
    latency = profile.check.get("latency", {})
    batches = latency.get("batch", [1])
    return Workload(
        eval_seqlen=int(quality.get("seqlen", 1024)),
        eval_windows=int(windows if windows is not None else quality.get("windows", 8)),
        prompt_tokens=int(latency.get("prompt_tokens", 512)),
        new_tokens=int(latency.get("new_tokens", 64)),
        batches=tuple(int(b) for b in (batches if isinstance(batches, list) else [batches])),
        runs=int(runs if runs is not None else latency.get("runs", 5)),
        warmup=int(latency.get("warmup", 1)),
        threads=int(latency.get("threads", os.cpu_count() or 1)),
    )


def verify_checkpoint(checkpoint: Checkpoint, model, recorded: dict | None) -> dict:
    """Measured sparsity and N:M compliance, checked against sparsity.json's claims."""
    from sparsedeploy.models.inspection import inferred_pattern, measure_linear_sublayers, worst_nm_compliance

    layers, total = measure_linear_sublayers(model)
    compliance = worst_nm_compliance(layers)
    pattern = inferred_pattern(layers, total)
    if recorded is not None:
        claimed = recorded.get("pattern")
        if claimed in ("2:4", "4:8") and compliance[claimed] < 1.0:
            raise BadInput(
                f"'{checkpoint.path}' claims {claimed} in {SPARSITY_FILE}, but only {compliance[claimed]:.4f} of the groups "
                f"of its worst layer comply (modified after pruning?); prune it again with `sparsedeploy prune`"
            )
        claimed_sparsity = (recorded.get("measured") or {}).get("total_sparsity")
        if claimed_sparsity is not None and abs(claimed_sparsity - total) > 1e-4:
            raise BadInput(
                f"'{checkpoint.path}' measures {total:.4%} zeros but its {SPARSITY_FILE} says {claimed_sparsity:.4%} "
                "(modified after pruning?); prune it again with `sparsedeploy prune`"
            )
        if recorded.get("method") in ("depth", "width"):
            pattern = "structured"
    return {"sparsity": total, "pattern": pattern, "nm_compliance": compliance}


def check_pattern(profile: TargetProfile, checkpoint: Checkpoint, pattern: str) -> None:
    if any(p in profile.patterns for p in COMPATIBLE_PATTERNS[pattern]):
        return
    needed = [p for p in profile.patterns if p in ("2:4", "4:8")]
    fix = (f"prune it to {needed[0]} first: sparsedeploy prune {checkpoint.spec} -o {checkpoint.path.name}-{needed[0].replace(':', 'of')} "
           f"--method sparsegpt --pattern {needed[0]}") if needed else f"use a target that accepts {pattern} checkpoints"
    raise BadInput(f"target '{profile.name}' accepts {', '.join(profile.patterns)} weights, but '{checkpoint.spec}' is {pattern}; {fix}")


def dense_source(checkpoint: Checkpoint, recorded: dict | None, pattern: str, explicit: str | None) -> Checkpoint:
    if explicit is None and recorded is None and pattern == "dense":
        return checkpoint
    return recorded_source(checkpoint, recorded, explicit, flag="--dense")


def evaluation_data(profile: TargetProfile, workload: Workload, checkpoint: Checkpoint):
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.data.windows import evaluation_windows, tokenize
    from sparsedeploy.models.checkpoint import load_tokenizer

    source = load_text(profile.check.get("quality", {}).get("data", "wikitext2"))
    tokenizer = load_tokenizer(checkpoint)
    windows = evaluation_windows(tokenize(tokenizer, source), workload.eval_seqlen, workload.eval_windows, source.name)
    return source, tokenizer, windows


def calibration_text(spec: dict | None, evaluation_source):
    """The calibration text a build's settings name (None when it calibrates nothing),
    read up front: a bad source fails before anything is built, and its sha256 goes into
    the cache key (a ``file:`` text can change under the same name). Never the evaluation
    text."""
    if spec is None:
        return None
    from sparsedeploy.data.sources import check_disjoint, load_text

    source = load_text(spec["data"])
    check_disjoint(source, evaluation_source)
    return source


def calibration_loader(spec: dict | None, source, tokenizer):
    """Calibration windows (``spec`` from ``calibration_settings``, ``source`` from
    ``calibration_text``) for static quantization, smoothing and GPTQ, tokenized on the
    first call only (the sparse and the dense build, and the several steps of one build,
    read the same windows); None when the build calibrates nothing."""
    if spec is None:
        return None

    @functools.cache
    def load():
        from sparsedeploy.data.windows import calibration_windows, tokenize

        return calibration_windows(tokenize(tokenizer, source), spec["seqlen"], spec["nsamples"], spec["seed"], source.name)

    return load


def artifact_key(checkpoint_sha: str, profile: TargetProfile, backend: Backend, settings: dict,
                 calibration_sha: str | None = None) -> str:
    fields = {"checkpoint": checkpoint_sha, "backend": backend.name, "engine": backend.engine_version(),
              "settings": settings, "stack": cache.stack_versions()}
    if calibration_sha is not None:
        fields["calibration_sha256"] = calibration_sha
    return cache.content_key(fields)


def measured(key_fields: dict, fresh: bool, compute) -> tuple[dict, str | None]:
    """A cached measurement (and when it was taken), or a fresh one, stored."""
    key = cache.content_key(key_fields)
    if not fresh:
        found = cache.load_measurement(key)
        if found is not None:
            return found, found.get("measured_at")
    value = compute()
    cache.store_measurement(key, value)
    return value, None


def artifact_summary(artifact: BuiltArtifact, relative_to: Path | None) -> dict:
    files = sorted(p for p in artifact.directory.rglob("*") if p.is_file())
    main = artifact.directory / artifact.main_file
    digests = artifact.details.get("files") or cache.directory_digests(artifact.directory)
    return {
        "path": str(main.relative_to(relative_to)) if relative_to else str(main),
        "bytes": sum(p.stat().st_size for p in files),
        # One digest over every file of the artifact (graph and external weights alike).
        "sha256": cache.content_key(digests),
        "sparsity": artifact.sparsity.get("sparsity", 0.0),
        "nm_compliance": artifact.sparsity.get("compliance", {}),
        "files": sorted(p.relative_to(artifact.directory).as_posix() for p in files),
        "details": {k: v for k, v in artifact.details.items() if k != "files"},
    }


# -- the on-target check (shared by build and check) --------------------------------


@dataclass
class CheckInputs:
    profile: dict  # the profile as used
    precision: str
    backend: Backend
    workload: Workload
    sparse: BuiltArtifact
    dense: BuiltArtifact
    sparse_key: str | None  # cache keys of the artifacts (None: do not cache measurements)
    dense_key: str | None
    reference_model_loader: object  # () -> torch model of the checkpoint
    reference_sha: str
    data: object  # TextSource
    windows: object  # [windows, seqlen] token ids
    same_shapes: bool
    fresh: bool
    baselines: tuple[str, ...] = ()  # the profile's [check] baselines, measured beside the dense build


@dataclass
class CheckResults:
    quality: dict  # the build against the PyTorch reference
    dense_quality: dict  # the dense build's perplexity
    rows: list[dict]  # latency per batch, sparse and dense
    kernels: dict  # what the engine says ran
    baselines: list[dict]  # per baseline: its quality and latency against the dense build, or why skipped
    cached_at: str | None  # when reused measurements were taken (None: all fresh)


def profile_baselines(profile: dict, backend: Backend) -> tuple[str, ...]:
    """The baselines a profile asks for, each one the backend knows."""
    names = profile.get("check", {}).get("baselines", [])
    unknown = [name for name in names if name not in backend.baselines]
    if unknown:
        known = ", ".join(backend.baselines) or "none"
        raise BadInput(f"the profile asks for baseline(s) {', '.join(unknown)} that backend '{backend.name}' does not measure "
                       f"(it measures: {known}); fix [check] baselines in the target profile")
    return tuple(names)


def run_check(inputs: CheckInputs) -> CheckResults:
    from sparsedeploy.checks.quality import torch_logits_fn

    workload, backend = inputs.workload, inputs.backend
    protocol = {"data": inputs.data.describe(), "seqlen": workload.eval_seqlen, "windows": workload.eval_windows}
    use_cache = inputs.sparse_key is not None and not inputs.fresh
    sessions: dict[str, object] = {}

    def session(name: str):
        if name not in sessions:
            artifact = inputs.sparse if name == "sparse" else inputs.dense
            info(f"Loading the {name} build into {backend.engine} ...")
            sessions[name] = backend.load(artifact, workload)
        return sessions[name]

    try:
        def quality():
            model = inputs.reference_model_loader()
            return quality_against_reference(session("sparse"), inputs.windows, torch_logits_fn(model), "pruned build vs PyTorch")

        def dense_quality():
            return engine_perplexity(session("dense"), inputs.windows, "dense build")

        def latency():
            info(f"Timing prefill ({workload.prompt_tokens} tokens) and decode ({workload.new_tokens} tokens), "
                 f"sparse and dense alternated, {workload.runs} runs ...")
            rows = latency_side_by_side(session("sparse"), session("dense"), workload)
            return {"rows": rows, "kernels": session("sparse").kernels()}

        def baseline(name: str) -> dict:
            info(f"Measuring the baseline {name} against the dense build ...")
            with backend.load_baseline(name, inputs.dense, workload) as opened:
                found = baseline_measurements(opened, session("dense"), inputs.windows, workload, name)
                return {"name": name, "description": backend.baselines[name], **found, "engine_kernels": opened.kernels()}

        stamps = []
        if use_cache:
            q, at1 = measured({"quality": inputs.sparse_key, "protocol": protocol, "reference": inputs.reference_sha}, False, quality)
            d, at2 = measured({"dense_quality": inputs.dense_key, "protocol": protocol}, False, dense_quality)
            lat, at3 = measured({"latency": [inputs.sparse_key, inputs.dense_key], "workload": workload.to_dict()}, False, latency)
            stamps = [at for at in (at1, at2, at3) if at]
        else:
            q, d, lat = quality(), dense_quality(), latency()
        baselines = []
        for name in inputs.baselines:
            missing = backend.baseline_unavailable(name)
            if missing:
                info(f"Baseline {name} skipped: {missing}")
                found = {"name": name, "description": backend.baselines[name], "skipped": missing}
            elif use_cache:
                found, at = measured({"baseline": name, "version": backend.baseline_version(name), "dense": inputs.dense_key,
                                      "protocol": protocol, "workload": workload.to_dict()}, False, lambda: baseline(name))
                stamps += [at] if at else []
            else:
                found = baseline(name)
            baselines.append(found)
    finally:
        for opened in sessions.values():
            opened.close()
    return CheckResults(q, d, lat["rows"], lat["kernels"], baselines, min(stamps) if stamps else None)


def compose_report(target: str, inputs: CheckInputs, checkpoint_info: dict, artifact_info: dict, results: CheckResults) -> dict:
    workload, quality, rows = inputs.workload, results.quality, results.rows
    primary = rows[0]
    kernel_state, evidence = judge_sparse_kernels(results.kernels, primary["speedup"], artifact_info["sparsity"], inputs.same_shapes)
    report = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "target": target,
        "backend": inputs.backend.name,
        "profile": inputs.profile,
        "engine": {"name": inputs.backend.engine, "version": inputs.backend.engine_version(), "device": inputs.backend.device},
        "precision": inputs.precision,
        "workload": workload.to_dict(),
        "checkpoint": checkpoint_info,
        "artifact": artifact_info,
        "quality": {
            "protocol": {"data": inputs.data.describe(), "seqlen": workload.eval_seqlen,
                         "windows": workload.eval_windows, "tokens": quality["tokens"]},
            "ppl_reference": quality["ppl_reference"],
            "ppl_target": quality["ppl_target"],
            "ppl_dense": results.dense_quality["ppl"],
            "delta_pct": (quality["ppl_target"] - quality["ppl_reference"]) / quality["ppl_reference"] * 100,
            "kl_mean": quality["kl_mean"],
            "top1_agreement": quality["top1_agreement"],
        },
        "latency": {
            "workload": {"prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens,
                         "batch": primary["batch"], "runs": workload.runs, "warmup": workload.warmup,
                         "threads": workload.threads},
            "sparse": without_runs(primary["sparse"]),
            "dense": without_runs(primary["dense"]),
            "speedup": primary["speedup"],
            "sparse_kernels": kernel_state,
            "evidence": evidence,
            "engine_kernels": results.kernels,
            "by_batch": rows,
        },
    }
    if results.baselines:
        report["baselines"] = results.baselines
    gates = evaluate_gates(report, gates_for(inputs.profile.get("gates", {}), inputs.precision))
    report["gates"] = gates
    report["passed"] = all(gate["passed"] for gate in gates)
    report["cached_measurements"] = results.cached_at
    return report


def write_report_files(directory: Path, report: dict) -> None:
    bundles.write_text(directory / bundles.REPORT_JSON, json.dumps(report, indent=2) + "\n")
    plot_latency(report, directory / PLOT_FILE)
    bundles.write_text(directory / bundles.REPORT_MD, render_markdown(report))


# -- build --------------------------------------------------------------------------


def default_output(profile: TargetProfile, checkpoint: Checkpoint, precision: str) -> Path:
    name = "default" if checkpoint.spec == "default" else checkpoint.path.name
    return Path("build") / f"{name}-{profile.name}-{precision}"


def build(request: BuildRequest) -> tuple[dict, Path]:
    from sparsedeploy.models.checkpoint import load_model

    started = time.perf_counter()
    profile = load_profile(request.target)
    backend = available_backend(profile)
    options = build_options(profile, backend, request)
    precision = choose_precision(profile, request.quant, backend.implied_precision(options))
    checkpoint = resolve_checkpoint(request.model)
    recorded = recorded_sparsity(checkpoint)
    workload = workload_for(profile, request.windows, request.runs)
    output = request.output if request.output is not None else default_output(profile, checkpoint, precision)
    output = check_output_dir(output, request.force, inputs=(checkpoint.path,))
    settings = backend.build_settings(precision, workload, options)
    baselines = profile_baselines(profile.raw, backend)

    info(f"[1/5] Verifying {checkpoint.spec} ...")
    backend.preflight(checkpoint.path)
    model = load_model(checkpoint)
    measured_checkpoint = verify_checkpoint(checkpoint, model, recorded)
    check_pattern(profile, checkpoint, measured_checkpoint["pattern"])
    dense_checkpoint = dense_source(checkpoint, recorded, measured_checkpoint["pattern"], request.dense)
    checkpoint_sha = checkpoint_sha256(checkpoint.path)
    dense_sha = checkpoint_sha if dense_checkpoint.path == checkpoint.path else checkpoint_sha256(dense_checkpoint.path)
    data, tokenizer, windows = evaluation_data(profile, workload, checkpoint)
    calibration_spec = settings.get("calibration")
    calibration_source = calibration_text(calibration_spec, data)
    calibration_sha = calibration_source.sha256 if calibration_source is not None else None
    if request.calib is not None and calibration_spec is None:
        info(f"warning: --calib {request.calib} is not used: this {precision} build for {profile.name} reads no calibration text")
    calibration = calibration_loader(calibration_spec, calibration_source, tokenizer)

    info(f"[2/5] Building {checkpoint.spec} for {profile.name} ({precision}) ...")
    sparse_key = artifact_key(checkpoint_sha, profile, backend, settings, calibration_sha)
    sparse, hit = cache.cached_artifact(
        sparse_key, lambda out: backend.build(BuildInputs(model, checkpoint_sha, precision, workload, options, calibration,
                                               checkpoint_dir=checkpoint.path), out)
    )
    info(f"      {'reused from the cache' if hit else 'built'}: {sparse.directory}")
    info(f"[3/5] Building the dense baseline {dense_checkpoint.spec} ({precision}) ...")
    dense_key = artifact_key(dense_sha, profile, backend, settings, calibration_sha)

    def build_dense(out: Path) -> BuiltArtifact:
        dense_model = model if dense_sha == checkpoint_sha else load_model(dense_checkpoint)
        return backend.build(BuildInputs(dense_model, dense_sha, precision, workload, options, calibration,
                                         checkpoint_dir=dense_checkpoint.path), out)

    dense, hit = cache.cached_artifact(dense_key, build_dense)
    info(f"      {'reused from the cache' if hit else 'built'}: {dense.directory}")

    info("[4/5] Checking on target: quality against PyTorch, latency against the dense build ...")
    parameters = stored_parameter_count(checkpoint)
    dense_parameters = parameters if dense_sha == checkpoint_sha else stored_parameter_count(dense_checkpoint)
    inputs = CheckInputs(
        profile=_profile_as_used(profile, workload, options), precision=precision, backend=backend, workload=workload,
        sparse=sparse, dense=dense, sparse_key=sparse_key, dense_key=dense_key,
        reference_model_loader=lambda: model, reference_sha=checkpoint_sha, data=data, windows=windows,
        same_shapes=parameters == dense_parameters, fresh=request.fresh, baselines=baselines,
    )
    results = run_check(inputs)
    checkpoint_info = {
        "path": checkpoint.spec if checkpoint.spec == "default" else str(checkpoint.path),
        "sha256": checkpoint_sha,
        **measured_checkpoint,
        "parameters": parameters,
        "method": (recorded or {}).get("method"),
        "dense_source": {"path": dense_checkpoint.spec if dense_checkpoint.spec == "default" else str(dense_checkpoint.path),
                         "sha256": dense_sha, "parameters": dense_parameters},
    }

    info(f"[5/5] Writing the bundle {output} ...")
    with staged_directory(output) as staging:
        bundles.place_tree(sparse.directory, staging / bundles.ARTIFACT_DIR)
        bundles.place_tree(dense.directory, staging / bundles.BASELINE_DIR)
        # Copied, never linked: the user's checkpoint must not change if the bundle does.
        bundles.place_tree(checkpoint.path, staging / bundles.REFERENCE_DIR, link=False)
        sparse_in_bundle = BuiltArtifact.from_directory(staging / bundles.ARTIFACT_DIR)
        artifact_info = artifact_summary(sparse_in_bundle, staging)
        if calibration_spec is not None:
            artifact_info["calibration"] = {**calibration_source.describe(), **{
                key: calibration_spec[key] for key in ("nsamples", "seqlen", "seed")}}
        report = compose_report(profile.name, inputs, checkpoint_info, artifact_info, results)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report_files(staging, report)
        bundles.write_manifest(staging)
    report["bundle"] = str(output)
    return report, output


def stored_parameter_count(checkpoint: Checkpoint) -> int:
    """Parameters in a checkpoint's safetensors, read from the headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(checkpoint.path.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += math.prod(shape)
    return total


def _profile_as_used(profile: TargetProfile, workload: Workload, options: dict | None = None) -> dict:
    used = json.loads(json.dumps(profile.raw))
    if options is not None:  # with what the command line changed (--calib, --gguf-type)
        used["build"] = json.loads(json.dumps(options))
    used.setdefault("check", {}).setdefault("quality", {})["windows"] = workload.eval_windows
    used["check"]["quality"]["seqlen"] = workload.eval_seqlen
    used["check"].setdefault("latency", {}).update(
        prompt_tokens=workload.prompt_tokens, new_tokens=workload.new_tokens, batch=list(workload.batches),
        runs=workload.runs, warmup=workload.warmup, threads=workload.threads,
    )
    used["name"] = profile.name
    return used


# -- check --------------------------------------------------------------------------


def check(bundle_path: Path) -> dict:
    """Verify the manifest, re-run the on-target check from the bundle alone, and say
    whether it reproduces the bundle's report."""
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.data.windows import evaluation_windows, tokenize
    from sparsedeploy.models.checkpoint import load_model, load_tokenizer

    bundle = bundle_path.expanduser().resolve()
    bundles.verify_manifest(bundle)
    info(f"Manifest of {bundle} verified")
    original = json.loads((bundle / bundles.REPORT_JSON).read_text())
    if original.get("schema") != SCHEMA:
        raise BadInput(f"'{bundle / bundles.REPORT_JSON}' is not a {SCHEMA} report; rebuild the bundle with this version")
    backend = get_backend(original["backend"])
    availability = backend.availability()
    if not availability.available:
        raise TargetUnavailable(f"target '{original['target']}' cannot run here: {availability.reason}")
    workload = Workload.from_dict(original["workload"])
    reference = resolve_checkpoint(str(bundle / bundles.REFERENCE_DIR))
    protocol = original["quality"]["protocol"]
    data = load_text(protocol["data"]["name"])
    if data.sha256 != protocol["data"]["sha256"]:
        raise BadInput(f"evaluation text '{data.name}' differs from the one the bundle was checked on; restore it")
    windows = evaluation_windows(tokenize(load_tokenizer(reference), data), workload.eval_seqlen, workload.eval_windows, data.name)
    model_cache = {}

    def reference_model():
        if "model" not in model_cache:
            model_cache["model"] = load_model(reference)
        return model_cache["model"]

    inputs = CheckInputs(
        profile=original["profile"], precision=original["precision"], backend=backend, workload=workload,
        sparse=BuiltArtifact.from_directory(bundle / bundles.ARTIFACT_DIR),
        dense=BuiltArtifact.from_directory(bundle / bundles.BASELINE_DIR),
        sparse_key=None, dense_key=None, reference_model_loader=reference_model,
        reference_sha=original["checkpoint"]["sha256"], data=data, windows=windows,
        same_shapes=original["checkpoint"]["parameters"] == original["checkpoint"]["dense_source"]["parameters"], fresh=True,
        baselines=profile_baselines(original["profile"], backend),
    )
    results = run_check(inputs)
    artifact_info = artifact_summary(inputs.sparse, bundle)
    report = compose_report(original["target"], inputs, original["checkpoint"], artifact_info, results)
    report["bundle"] = str(bundle)
    report["reproduction"] = compare_quality(original["quality"], report["quality"])
    return report


def compare_quality(original: dict, again: dict) -> dict:
    checks = {
        "ppl_target": abs(again["ppl_target"] - original["ppl_target"]) <= REPRODUCE_PPL_REL * original["ppl_target"],
        "ppl_reference": abs(again["ppl_reference"] - original["ppl_reference"]) <= REPRODUCE_PPL_REL * original["ppl_reference"],
        "kl_mean": abs(again["kl_mean"] - original["kl_mean"]) <= REPRODUCE_KL_ABS + 0.01 * original["kl_mean"],
        "top1_agreement": abs(again["top1_agreement"] - original["top1_agreement"]) <= REPRODUCE_TOP1_ABS,
    }
    return {
        "reproduced": all(checks.values()),
        "checks": checks,
        "original": {key: original[key] for key in checks},
        "tolerance": {"ppl_rel": REPRODUCE_PPL_REL, "kl_abs": REPRODUCE_KL_ABS, "top1_abs": REPRODUCE_TOP1_ABS},
    }

