"""The `sparsedeploy` command line. Thin: parse, call the pipeline, print.

`--json` prints exactly one JSON document on stdout; progress and logs go to stderr.
Exit codes: 0 ok, 1 a gate failed, 2 bad input, 3 target cannot run here, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparsedeploy import __version__
from sparsedeploy.errors import Interrupted, SparsedeployError
from sparsedeploy.ui import stderr

app = typer.Typer(
    name="sparsedeploy",
    help="Prune an LLM checkpoint, build it for a sparse inference engine, and check on the target that it is faster and still good.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(width=None if sys.stdout.isatty() else 160)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def _print_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@app.command("eval")
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="`default` or a local Hugging Face directory.")],
    data: Annotated[str, typer.Option(help="Evaluation text source.")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 1024,
    windows: Annotated[int, typer.Option(help="Number of windows (the first N of the text).")] = 40,
    json_output: JsonFlag = False,
) -> None:
    """Perplexity of a checkpoint on a fixed, stated protocol."""
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    started = time.perf_counter()
    source = load_text(data)
    resolved = resolve_checkpoint(checkpoint)
    _quiet_libraries()
    from sparsedeploy.checks.quality import evaluate, torch_logits_fn
    from sparsedeploy.data.windows import evaluation_windows, tokenize

    tokenizer = load_tokenizer(resolved)
    token_windows = evaluation_windows(tokenize(tokenizer, source), seqlen, windows, source.name)
    model = load_model(resolved)
    result = evaluate(torch_logits_fn(model), token_windows, description=f"eval {source.name}")
    document = {
        "ppl": result.ppl,
        "data": source.describe(),
        "seqlen": seqlen,
        "windows": windows,
        "tokens": result.tokens,
        "mean_nll": result.mean_nll,
        "checkpoint": str(resolved.path),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if json_output:
        _print_json(document)
    else:
        stdout.print(
            f"perplexity {result.ppl:.4f} on {source.name} ({windows} windows x {seqlen} tokens, "
            f"{result.tokens} predicted tokens) in {document['seconds']} s"
        )


@app.command("prune")
def prune_command(
    checkpoint: Annotated[str, typer.Argument(help="`default` or a local Hugging Face directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the pruned checkpoint.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="Unstructured sparsity, e.g. 0.5.")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="N:M pattern along the input dimension: 2:4 or 4:8.")] = None,
    owl: Annotated[bool, typer.Option("--owl", help="Outlier-weighted per-layer sparsity (unstructured only).")] = False,
    calib: Annotated[str, typer.Option(help="Calibration text source (never the evaluation text).")] = "canterbury",
    nsamples: Annotated[int, typer.Option(help="Calibration samples.")] = 64,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sample.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample offsets.")] = 0,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Glob of linear sublayers to leave dense, e.g. '*down_proj' (repeatable).")] = None,
    structured: Annotated[Optional[str], typer.Option(help="depth (whole decoder layers) or width (heads, FFN channels): shapes really shrink.")] = None,
    drop: Annotated[int, typer.Option(help="--structured depth: decoder layers to remove.")] = 0,
    heads: Annotated[float, typer.Option(help="--structured width: share of attention head groups to remove.")] = 0.0,
    ffn: Annotated[float, typer.Option(help="--structured width: share of FFN channels to remove.")] = 0.0,
    device: Annotated[str, typer.Option(help="cpu or cuda: where each layer is calibrated (and recovery trains).")] = "cpu",
    recover_steps: Annotated[int, typer.Option(help="Then recover: this many distillation steps from the dense model (`recover` has every option).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Prune a checkpoint layer by layer; writes a Hugging Face checkpoint plus sparsity.json."""
    from sparsedeploy.atomic import check_output_dir
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.prune.methods import SparsityTarget, get_method
    from sparsedeploy.prune.patterns import parse_nm
    from sparsedeploy.errors import BadInput
    from sparsedeploy.prune.run import Calibration, PruneRequest, Structured, prune_checkpoint

    if structured is not None:
        if sparsity is not None or pattern is not None:
            raise BadInput("choose --sparsity/--pattern or --structured, not both (prune twice to combine them)")
        shape = Structured(structured, drop, heads, ffn)
        target, pruning_method = None, None
    else:
        shape = None
        target = SparsityTarget(sparsity=sparsity, pattern=parse_nm(pattern) if pattern else None)
        pruning_method = get_method(method)
    resolved = resolve_checkpoint(checkpoint)
    destination = check_output_dir(output, force, inputs=(resolved.path,))
    if recover_steps < 0:
        raise BadInput(f"--recover-steps {recover_steps} must be 0 (no recovery) or more")
    _quiet_libraries()
    if recover_steps:
        _prune_then_recover(resolved, destination, recover_steps, device, json_output, method=pruning_method, target=target,
                            structured=shape, calibration=Calibration(calib, nsamples, seqlen, seed), owl=owl,
                            exclude=tuple(exclude or ()))
        return
    request = PruneRequest(
        checkpoint=resolved,
        output=destination,
        method=pruning_method,
        target=target,
        structured=shape,
        calibration=Calibration(calib, nsamples, seqlen, seed),
        owl=owl,
        exclude=tuple(exclude or ()),
        device=device,
    )
    document = prune_checkpoint(request)
    if json_output:
        _print_json({"path": str(destination), **document})
    else:
        measured = document["measured"]
        stdout.print(
            f"wrote {destination}: {document['method']} {document['pattern']}, {measured['parameters']:,} parameters, "
            f"sparsity {measured['total_sparsity']:.2%} of decoder linears, "
            f"2:4 compliance {measured['nm_compliance']['2:4']:.3f}, in {document['seconds']} s"
        )


def _prune_then_recover(source, destination: Path, steps: int, device: str, json_output: bool, **prune_options) -> None:
    """Prune into a hidden directory beside the output, then recover from it into the
    output. If recovery is interrupted or diverges, the one-shot checkpoint is kept so
    that `recover` can resume from the last saved step; otherwise it is removed."""
    import shutil

    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.prune.run import PruneRequest, prune_checkpoint
    from sparsedeploy.recover.run import RecoverRequest, RecoverSettings, TrainingDiverged, recover_checkpoint

    settings = RecoverSettings(steps=steps, device=device)
    settings.validate()  # before the long prune, not after it
    one_shot = destination.parent / f".{destination.name}.one-shot"
    prune_checkpoint(PruneRequest(checkpoint=source, output=one_shot, device=device, **prune_options))
    try:
        document = recover_checkpoint(RecoverRequest(checkpoint=resolve_checkpoint(str(one_shot)), output=destination,
                                                     settings=settings))
    except (Interrupted, TrainingDiverged) as error:
        resume = f"sparsedeploy recover {one_shot} -o {destination} --steps {steps}"
        raise type(error)(f"{str(error).split(';')[0]} during recovery; no output was written. The one-shot checkpoint "
                          f"is kept: `{resume}` resumes from the last saved step") from None
    except BaseException:
        shutil.rmtree(one_shot, ignore_errors=True)
        raise
    shutil.rmtree(one_shot, ignore_errors=True)
    _print_recovered(destination, document, json_output)


def _print_recovered(destination: Path, document: dict, json_output: bool) -> None:
    if json_output:
        _print_json({"path": str(destination), **document})
        return
    recovery, measured = document["recovery"], document["measured"]
    stdout.print(
        f"wrote {destination}: {document.get('method')} {document.get('pattern')} recovered in {recovery['steps']} steps "
        f"({recovery['tokens_seen']:,} tokens), held-out loss {recovery['heldout_loss_before']:.4f} -> "
        f"{recovery['heldout_loss_after']:.4f}, sparsity {measured['total_sparsity']:.2%}, "
        f"2:4 compliance {measured['nm_compliance']['2:4']:.3f}, in {recovery['seconds']} s"
    )


@app.command("recover")
def recover_command(
    checkpoint: Annotated[str, typer.Argument(help="A pruned checkpoint directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the recovered checkpoint.")],
    teacher: Annotated[Optional[str], typer.Option(help="Dense teacher; default: the source recorded in sparsity.json.")] = None,
    data: Annotated[str, typer.Option(help="Training text source (never the evaluation text).")] = "canterbury-books",
    steps: Annotated[int, typer.Option(help="Optimizer steps (fewer if the held-out loss stops improving).")] = 120,
    seqlen: Annotated[int, typer.Option(help="Tokens per training window.")] = 256,
    batch: Annotated[int, typer.Option(help="Windows per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 2e-4,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    lm_weight: Annotated[float, typer.Option(help="Share of the plain next-token loss mixed into the KL loss.")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations (and saved states).")] = 25,
    heldout_windows: Annotated[int, typer.Option(help="Windows from the end of the training text held out for early stopping.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Distil a pruned checkpoint from its dense model; pruned weights stay exactly zero."""
    from sparsedeploy.atomic import check_output_dir
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.recover.run import RecoverRequest, RecoverSettings, recover_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    destination = check_output_dir(output, force, inputs=(resolved.path,))
    settings = RecoverSettings(steps=steps, seqlen=seqlen, batch=batch, lr=lr, temperature=temperature,
                               lm_weight=lm_weight, data=data, eval_every=eval_every, heldout_windows=heldout_windows,
                               seed=seed, device=device)
    settings.validate()
    _quiet_libraries()
    document = recover_checkpoint(RecoverRequest(checkpoint=resolved, output=destination, teacher=teacher, settings=settings))
    _print_recovered(destination, document, json_output)


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[str, typer.Argument(help="`default` or a local Hugging Face directory.")],
    json_output: JsonFlag = False,
) -> None:
    """Parameters, per-layer sparsity and N:M compliance, NaN/Inf weights."""
    from sparsedeploy.errors import BadInput
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.models.inspection import inspect_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    _quiet_libraries()
    report = inspect_checkpoint(resolved)
    if json_output:
        _print_json(report)
    else:
        _print_inspection(report)
    nonfinite = report["nonfinite"]
    if nonfinite["tensors"]:
        raise BadInput(
            f"'{report['path']}' has {nonfinite['values']} NaN/Inf weights in {nonfinite['tensors']} tensors "
            f"(first: {nonfinite['first']}); the checkpoint is corrupt: re-create it from its source"
        )


def _print_inspection(report: dict) -> None:
    geometry = report["geometry"]
    stdout.print(
        f"[bold]{report['architecture']}[/] {report['path']}\n"
        f"{report['parameters']:,} parameters, {report['decoder_layers']} decoder layers, "
        f"hidden {geometry['hidden_size']}, heads {geometry['num_heads']} (kv {geometry['num_kv_heads']}), "
        f"ffn {geometry['intermediate_size']}\n"
        f"sparsity of decoder linears {report['total_sparsity']:.2%}, pattern {report['pattern']}"
    )
    table = Table("layer", "role", "shape", "sparsity", "2:4", "4:8", "NaN/Inf")
    for layer in report["layers"]:
        table.add_row(
            layer["name"],
            layer["role"],
            "x".join(map(str, layer["shape"])),
            f"{layer['sparsity']:.2%}",
            f"{layer['nm_compliance']['2:4']:.3f}",
            f"{layer['nm_compliance']['4:8']:.3f}",
            str(layer["nonfinite"]),
        )
    stdout.print(table)


@app.command("targets")
def targets_command(json_output: JsonFlag = False) -> None:
    """The target profiles, and whether each can run on this machine (and why not)."""
    from sparsedeploy.targets import describe_targets

    targets = describe_targets()
    if json_output:
        _print_json(targets)
        return
    table = Table("target", "backend", "device", "precisions", "patterns", "available here")
    for target in targets:
        status = "[green]yes[/]" if target["available"] else "[red]no[/]"
        table.add_row(
            target["name"],
            target["backend"],
            target["device"],
            ", ".join(target["precisions"]),
            ", ".join(target["patterns"]),
            f"{status}: {target['reason']}",
        )
    stdout.print(table)


@app.command("build")
def build_command(
    target: Annotated[Optional[str], typer.Option(help="Target profile name (see `sparsedeploy targets`).")] = None,
    model: Annotated[str, typer.Option(help="`default` or a local (pruned) Hugging Face directory.")] = "default",
    quant: Annotated[str, typer.Option(help="none (the profile's precision), int8, int4, or fp8 (tensorrt, sm_89+).")] = "none",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Bundle directory (default build/MODEL-TARGET-PRECISION).")] = None,
    all_targets: Annotated[bool, typer.Option("--all", help="Build every target that can run here (bundles under -o/TARGET).")] = False,
    dense: Annotated[Optional[str], typer.Option(help="Dense source model for the latency baseline (default: the one sparsity.json names).")] = None,
    windows: Annotated[Optional[int], typer.Option(help="Override the profile's number of quality windows.")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Override the profile's number of timed runs.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Re-measure instead of reusing cached measurements.")] = False,
    gguf_type: Annotated[Optional[str], typer.Option(help="gguf target: any llama.cpp type (Q4_K_M, Q5_K_M, Q8_0, F16 ...); "
                                                     "default Q8_0 for int8, Q4_K_M for int4.")] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text for builds that calibrate (int8, int4): "
                                                 "canterbury, canterbury-books, file:PATH, hf:NAME; default: the profile's.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Build a checkpoint for a target, check it there against PyTorch and a dense build, write a bundle."""
    from sparsedeploy.build.pipeline import BuildRequest, build
    from sparsedeploy.build.report import verdict
    from sparsedeploy.errors import BadInput, GateFailed

    if all_targets == (target is not None):
        raise BadInput("pass exactly one of --target NAME or --all")
    _quiet_libraries()
    if all_targets:
        from sparsedeploy.targets import describe_targets

        names = [t["name"] for t in describe_targets() if t["available"]]
        skipped = [f"{t['name']} ({t['reason']})" for t in describe_targets() if not t["available"]]
        if skipped:
            stderr.print("skipping targets that cannot run here: " + "; ".join(skipped), highlight=False)
    else:
        names = [target]
    reports = []
    for name in names:
        destination = (output / name if output is not None else None) if all_targets else output
        request = BuildRequest(name, model, quant, destination, force, dense, windows, runs, fresh,
                               _gguf_type_for(name, gguf_type) if all_targets else gguf_type, calib)
        if all_targets and quant != "none":
            from sparsedeploy.targets import load_profile

            if quant not in load_profile(name).precisions:
                stderr.print(f"skipping {name}: it does not build {quant}", highlight=False)
                continue
        report, bundle = build(request)
        reports.append(report)
        if not json_output:
            _print_build_summary(report, bundle, verdict(report))
    if json_output:
        _print_json(reports if all_targets else reports[0])
    failed = [f"{r['target']}: {g['name']} = {g['value']:.4g} (limit {g['limit']})" for r in reports for g in r["gates"] if not g["passed"]]
    if failed:
        raise GateFailed("gate failed: " + "; ".join(failed) + "; the bundle was written with its report")


def _gguf_type_for(target: str, gguf_type: str | None) -> str | None:
    """With --all, --gguf-type goes to the targets whose backend takes it (llama.cpp)."""
    if gguf_type is None:
        return None
    from sparsedeploy.backends import get_backend
    from sparsedeploy.targets import load_profile

    return gguf_type if "gguf_type" in get_backend(load_profile(target).backend).command_line_options else None


def _print_build_summary(report: dict, bundle: Path, sentence: str) -> None:
    quality, latency = report["quality"], report["latency"]
    stdout.print(f"[bold]{report['target']}[/] ({report['precision']}) -> {bundle}")
    stdout.print(
        f"  quality: ppl {quality['ppl_target']:.4f} on target, {quality['ppl_reference']:.4f} PyTorch reference "
        f"({quality['delta_pct']:+.2f} %), dense source {quality['ppl_dense']:.4f}; KL {quality['kl_mean']:.5f}, "
        f"top-1 agreement {quality['top1_agreement']:.4f}"
    )
    stdout.print(
        f"  latency (batch {latency['workload']['batch']}): prefill {latency['sparse']['prefill_tok_s']:.1f} tok/s vs dense "
        f"{latency['dense']['prefill_tok_s']:.1f} ({latency['speedup']['prefill']:.2f}x), decode "
        f"{latency['sparse']['decode_tok_s']:.1f} tok/s vs {latency['dense']['decode_tok_s']:.1f} ({latency['speedup']['decode']:.2f}x)"
    )
    stdout.print(f"  {sentence}", highlight=False)
    for gate in report["gates"]:
        mark = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        stdout.print(f"  gate {gate['name']}: {gate['value']:.4g} (limit {gate['limit']}) {mark}")
    stdout.print(f"  report: {bundle / 'report.md'}")


@app.command("check")
def check_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory written by `sparsedeploy build`.")],
    json_output: JsonFlag = False,
) -> None:
    """Verify a bundle's manifest and re-run its on-target check from the bundle alone."""
    from sparsedeploy.build.pipeline import check
    from sparsedeploy.build.report import verdict
    from sparsedeploy.errors import GateFailed

    _quiet_libraries()
    report = check(bundle)
    reproduction = report["reproduction"]
    if json_output:
        _print_json(report)
    else:
        _print_build_summary(report, Path(report["bundle"]), verdict(report))
        state = "[green]reproduced[/]" if reproduction["reproduced"] else "[red]NOT reproduced[/]"
        stdout.print(f"  quality of the bundle's report {state} (tolerances {reproduction['tolerance']})")
    problems = [k for k, ok in reproduction["checks"].items() if not ok]
    problems += [f"gate {g['name']} = {g['value']:.4g} (limit {g['limit']})" for g in report["gates"] if not g["passed"]]
    if problems:
        raise GateFailed("check failed: " + "; ".join(problems))


@app.command("provision")
def provision_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `build --target gguf`.")],
    host: Annotated[str, typer.Option(help="USER@HOST of the device.")],
    port: Annotated[int, typer.Option(help="SSH port.")] = 22,
    identity: Annotated[Optional[Path], typer.Option(help="Private key (default: ssh-agent and ~/.ssh keys).")] = None,
    known_hosts: Annotated[Optional[Path], typer.Option(help="known_hosts file holding the device's key (default ~/.ssh/known_hosts).")] = None,
    remote_dir: Annotated[str, typer.Option(help="Directory on the device, relative to the login's home unless absolute.")] = "sparsedeploy",
    chunks: Annotated[int, typer.Option(help="llama-perplexity windows run on the device.")] = 4,
    threads: Annotated[Optional[int], typer.Option(help="Threads on the device (default: its cores).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Copy a GGUF bundle to a device over SSH (host key checked, sha256 verified there, swapped in
    atomically), run llama.cpp's check on the device, and add its report to the bundle."""
    from sparsedeploy.edge.provision import ProvisionRequest, provision
    from sparsedeploy.errors import BadInput, GateFailed

    if chunks < 1:
        raise BadInput(f"--chunks {chunks}: pass at least 1")
    report = provision(ProvisionRequest(bundle, host, port, identity, known_hosts, remote_dir, chunks, threads=threads))
    if json_output:
        _print_json(report)
        return
    device, quality, latency = report["device"], report["quality"], report["latency"]
    stdout.print(f"[bold]{device['host']}[/] ({device['arch']}, {device['cores']} cores, {device['cpu']}): "
                 f"{report['remote']['current']}")
    stdout.print(f"  llama-perplexity: {quality['ppl_device']:.4f} on the device, {quality['ppl_here']:.4f} here "
                 f"({quality['delta_pct']:+.3f} %): {'reproduced' if quality['reproduced'] else 'NOT reproduced'}")
    speeds = [f"{name} {value:.1f} tok/s" for name, value in (("prompt", latency["prompt_tok_s"]), ("decode", latency["decode_tok_s"])) if value]
    stdout.print(f"  speed on the device ({latency['threads']} threads): {', '.join(speeds) or 'not reported'}")
    if not quality["reproduced"]:
        raise GateFailed(f"the device's perplexity {quality['ppl_device']:.4f} differs from this machine's {quality['ppl_here']:.4f} by more than 1 %")


@app.command("version")
def version_command() -> None:
    """Print the tool's version."""
    stdout.print(f"sparsedeploy {__version__}")


def _interrupt(signum, frame) -> None:
    raise Interrupted("interrupted; nothing half-written was left behind")


def main() -> None:
    # Ctrl-C raises our own error, not KeyboardInterrupt, so that the CLI library does
    # not turn it into exit 1; `finally` blocks still clean up temporary output.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app(prog_name="sparsedeploy")  # usage errors exit 2 inside the CLI library
    except SparsedeployError as error:
        stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # "[build]" is text
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
