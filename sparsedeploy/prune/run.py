"""`sparsedeploy prune`: dense checkpoint in, pruned Hugging Face checkpoint plus
`sparsity.json` out, written atomically; the input is only ever read."""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsedeploy import __version__
from sparsedeploy.atomic import staged_directory
from sparsedeploy.data.sources import check_disjoint, load_text
from sparsedeploy.data.windows import calibration_windows, tokenize
from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import ArchitectureAdapter, LinearSublayer, adapter_for
from sparsedeploy.models.checkpoint import Checkpoint, checkpoint_sha256, load_model, load_tokenizer
from sparsedeploy.models.inspection import SPARSITY_FILE, measure_linear_sublayers, unique_parameter_count, worst_nm_compliance
from sparsedeploy.prune.masks import check_nm_shape
from sparsedeploy.prune.methods import InputSquareNorms, PruningMethod, SparsityTarget
from sparsedeploy.prune.owl import DEFAULT_LAMBDA, DEFAULT_THRESHOLD_M, outlier_ratio, owl_layer_sparsities
from sparsedeploy.prune.patterns import nm_compliance
from sparsedeploy.prune.scores import wanda_scores
from sparsedeploy.prune.structured import check_width_supported, prune_depth, prune_width
from sparsedeploy.prune.sequential import LayerInputs, calibrate_layer, capture_first_layer_inputs, run_layer
from sparsedeploy.ui import info, progress_iter

EVALUATION_SOURCE = "wikitext2"


@dataclass(frozen=True)
class Calibration:
    source: str = "canterbury"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Structured:
    """Structured pruning: drop whole decoder layers, or heads and FFN channels."""

    kind: str  # "depth" or "width"
    drop: int = 0  # depth: decoder layers to remove
    heads: float = 0.0  # width: share of attention head groups to remove
    ffn: float = 0.0  # width: share of FFN channels to remove

    def __post_init__(self):
        if self.kind not in ("depth", "width"):
            raise BadInput(f"--structured {self.kind} is unknown; use --structured depth --drop N or --structured width --heads F --ffn F")
        if self.kind == "depth" and self.drop < 1:
            raise BadInput("--structured depth needs --drop N with N >= 1 decoder layers to remove")
        if self.kind == "width" and not (self.heads > 0 or self.ffn > 0):
            raise BadInput("--structured width needs --heads F and/or --ffn F, the shares to remove (e.g. --ffn 0.25)")


@dataclass(frozen=True)
class PruneRequest:
    checkpoint: Checkpoint
    output: Path
    method: PruningMethod | None = None
    target: SparsityTarget | None = None
    structured: Structured | None = None
    calibration: Calibration = field(default_factory=Calibration)
    owl: bool = False
    exclude: tuple[str, ...] = ()
    device: str = "cpu"

    @property
    def calibrated(self) -> bool:
        return self.structured is not None or self.owl or self.method.calibrated

    @property
    def label(self) -> str:
        return "structured" if self.structured else self.target.label


def selected_linears(adapter: ArchitectureAdapter, layer_index: int, exclude: tuple[str, ...]) -> list[LinearSublayer]:
    """The layer's linear sublayers minus those matching an --exclude glob (matched
    against the full name and the name inside the layer, e.g. 'mlp.down_proj')."""
    return [
        linear
        for linear in adapter.decoder_layer(layer_index).linears
        if not any(fnmatch.fnmatch(linear.name, p) or fnmatch.fnmatch(linear.local_name, p) for p in exclude)
    ]


def validate_request(request: PruneRequest, adapter: ArchitectureAdapter) -> None:
    if request.structured is not None:
        if request.owl or request.exclude:
            raise BadInput("--owl and --exclude apply to unstructured and N:M pruning, not to --structured; drop them")
        if request.structured.kind == "width":
            check_width_supported(adapter)
        return
    if request.owl and request.target.pattern is not None:
        raise BadInput("--owl sets non-uniform per-layer sparsity, which N:M patterns cannot have; use --sparsity with --owl")
    chosen = [linear for i in range(adapter.num_layers) for linear in selected_linears(adapter, i, request.exclude)]
    if not chosen:
        raise BadInput(f"--exclude {list(request.exclude)} excludes every linear sublayer; nothing would be pruned")
    if request.target.pattern is not None:
        for linear in chosen:
            check_nm_shape(linear.module.weight.shape, request.target.pattern)
    if request.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda was given but this machine has no CUDA GPU; use --device cpu")


def calibration_samples(request: PruneRequest, tokenizer) -> tuple[torch.Tensor, dict]:
    calibration = request.calibration
    source = load_text(calibration.source)
    check_disjoint(source, load_text(EVALUATION_SOURCE))
    samples = calibration_windows(tokenize(tokenizer, source), calibration.seqlen, calibration.nsamples, calibration.seed, source.name)
    record = {
        **source.describe(),
        "nsamples": calibration.nsamples,
        "seqlen": calibration.seqlen,
        "tokens": int(samples.numel()),
        "seed": calibration.seed,
    }
    return samples, record


def owl_layer_targets(adapter: ArchitectureAdapter, inputs: LayerInputs, request: PruneRequest) -> list[float]:
    """OWL's pass over the dense model: each decoder layer's share of outlier Wanda
    scores, turned into per-layer sparsities with the requested mean."""
    ratios = []
    hidden = inputs.hidden_states
    for index in progress_iter(range(adapter.num_layers), "OWL outlier ratios", total=adapter.num_layers):
        layer = adapter.decoder_layer(index)
        linears = selected_linears(adapter, index, request.exclude)
        layer.module.to(request.device)
        norms, hidden = calibrate_layer(layer, linears, hidden, inputs.layer_kwargs[index], request.device, InputSquareNorms)
        scores = [wanda_scores(linear.module.weight, norms[linear.name].value) for linear in linears]
        ratios.append(outlier_ratio(scores, DEFAULT_THRESHOLD_M))
        layer.module.to("cpu")
    return owl_layer_sparsities(ratios, request.target.sparsity, DEFAULT_LAMBDA)


@torch.no_grad()
def prune_model(model: torch.nn.Module, request: PruneRequest, samples: torch.Tensor | None) -> dict:
    """Prune in place, one decoder layer at a time. Returns what sparsity.json records
    about the run (per-layer targets for OWL)."""
    adapter = adapter_for(model)
    method = request.method
    inputs = capture_first_layer_inputs(adapter, samples) if request.calibrated else None

    layer_targets = [request.target] * adapter.num_layers
    owl_record = None
    if request.owl:
        sparsities = owl_layer_targets(adapter, inputs, request)
        layer_targets = [SparsityTarget(sparsity=s) for s in sparsities]
        owl_record = {"threshold_m": DEFAULT_THRESHOLD_M, "lambda": DEFAULT_LAMBDA, "layer_sparsity": sparsities}

    hidden = inputs.hidden_states if method.calibrated else None
    for index in progress_iter(range(adapter.num_layers), f"{method.name} {request.target.label}", total=adapter.num_layers):
        layer = adapter.decoder_layer(index)
        linears = selected_linears(adapter, index, request.exclude)
        layer.module.to(request.device)
        statistics = {linear.name: None for linear in linears}
        if method.calibrated:
            statistics, _ = calibrate_layer(layer, linears, hidden, inputs.layer_kwargs[index], request.device, method.statistics)
        for linear in linears:
            weight = linear.module.weight
            weight.copy_(method.prune(weight, statistics[linear.name], layer_targets[index]))
            _check_pattern(linear, layer_targets[index])
        if method.calibrated and index + 1 < adapter.num_layers:
            # The next layer calibrates on what this pruned layer really outputs.
            hidden = run_layer(layer.module, hidden, inputs.layer_kwargs[index], request.device)
        layer.module.to("cpu")
    return {"owl": owl_record}


def _describe(request: PruneRequest) -> str:
    if request.structured is not None:
        if request.structured.kind == "depth":
            return f"drop {request.structured.drop} decoder layers by block importance"
        return f"remove {request.structured.heads:.0%} of head groups and {request.structured.ffn:.0%} of FFN channels"
    amount = f" {request.target.sparsity:.0%}" if request.target.sparsity else ""
    return f"{request.method.name} to {request.target.label}{amount}" + (" with OWL" if request.owl else "")


def _check_pattern(linear: LinearSublayer, target: SparsityTarget) -> None:
    if target.pattern is not None and nm_compliance(linear.module.weight, target.pattern) != 1.0:
        raise RuntimeError(f"internal error: {linear.name} does not comply with {target.pattern} after pruning")


def prune_checkpoint(request: PruneRequest) -> dict:
    """The whole `prune` command: returns the sparsity.json document it wrote."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(request.checkpoint)
    model = load_model(request.checkpoint)
    adapter = adapter_for(model)
    validate_request(request, adapter)

    samples, calibration_record = calibration_samples(request, tokenizer) if request.calibrated else (None, None)
    info(f"Pruning {request.checkpoint.spec}: {_describe(request)}"
         + (f", calibrated on {calibration_record['nsamples']} x {calibration_record['seqlen']} tokens of {calibration_record['name']}" if samples is not None else ""))
    structured_record = owl_record = None
    if request.structured is None:
        owl_record = prune_model(model, request, samples)["owl"]
    elif request.structured.kind == "depth":
        structured_record = prune_depth(model, adapter, samples, request.structured.drop, request.device)
    else:
        structured_record = prune_width(model, adapter, samples, request.structured.heads, request.structured.ffn, request.device)

    layers, total_sparsity = measure_linear_sublayers(model)
    document = {
        "schema": "sparsedeploy.sparsity/1",
        "tool_version": __version__,
        "method": request.structured.kind if request.structured else request.method.name,
        "pattern": request.label,
        "target_sparsity": None if request.structured else request.target.fraction,
        "owl": owl_record,
        "structured": structured_record,
        "calibration": calibration_record,
        "source": {"path": request.checkpoint.spec if request.checkpoint.spec == "default" else str(request.checkpoint.path),
                   "sha256": checkpoint_sha256(request.checkpoint.path)},
        "excluded": list(request.exclude),
        "device": request.device,
        "measured": {
            "parameters": unique_parameter_count(model),
            "total_sparsity": total_sparsity,
            "nm_compliance": worst_nm_compliance(layers),
        },
        "layers": layers,
        "recovery": None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    with staged_directory(request.output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / SPARSITY_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document
