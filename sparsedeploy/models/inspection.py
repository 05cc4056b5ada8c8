"""What a checkpoint holds: parameters, per-layer sparsity (exact zeros), N:M
compliance along the input dimension, and NaN/Inf weights."""

from __future__ import annotations

import json

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.models.checkpoint import Checkpoint, load_model, nonfinite_tensors
from sparsedeploy.prune.patterns import MEASURED_PATTERNS, nm_compliance_all

SPARSITY_FILE = "sparsity.json"
# Below this share of exact zeros a model counts as dense: dequantized or trained
# weights hold a few incidental zeros (the default model has 0.03%).
DENSE_BELOW = 0.01


def unique_parameter_count(model: torch.nn.Module) -> int:
    """Parameters counted once even when tied (embedding and LM head)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def inferred_pattern(layers: list[dict], total_sparsity: float) -> str:
    """The strictest pattern every layer satisfies, as a deployment engine would see it."""
    if total_sparsity < DENSE_BELOW:
        return "dense"
    for name in MEASURED_PATTERNS:
        if layers and all(layer["nm_compliance"][name] == 1.0 for layer in layers):
            return name
    return "unstructured"


def measure_linear_sublayers(model: torch.nn.Module) -> tuple[list[dict], float]:
    """Per decoder linear sublayer: shape, exact-zero sparsity, N:M compliance, NaN/Inf;
    and the sparsity over all of them together."""
    layers = []
    zeros = total = 0
    for linear in adapter_for(model).linear_sublayers():
        weight = linear.module.weight.detach()
        layer_zeros = int((weight == 0).sum())
        zeros += layer_zeros
        total += weight.numel()
        layers.append(
            {
                "name": linear.name,
                "role": linear.role,
                "shape": list(weight.shape),
                "sparsity": layer_zeros / weight.numel(),
                "nm_compliance": nm_compliance_all(weight),
                "nonfinite": int((~torch.isfinite(weight)).sum()),
            }
        )
    return layers, (zeros / total if total else 0.0)


def worst_nm_compliance(layers: list[dict]) -> dict[str, float]:
    """Per measured pattern, the compliance of the least compliant layer (what an engine
    that needs the pattern everywhere can count on)."""
    return {name: min((layer["nm_compliance"][name] for layer in layers), default=1.0) for name in MEASURED_PATTERNS}


def inspect_model(checkpoint: Checkpoint, model: torch.nn.Module) -> dict:
    adapter = adapter_for(model)
    layers, total_sparsity = measure_linear_sublayers(model)
    recorded = _recorded_sparsity(checkpoint)
    geometry = adapter.geometry()
    nonfinite = nonfinite_tensors(model)
    return {
        "path": str(checkpoint.path),
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.model_type,
        "parameters": unique_parameter_count(model),
        "decoder_layers": adapter.num_layers,
        "geometry": {
            "hidden_size": geometry.hidden_size,
            "num_heads": geometry.num_heads,
            "num_kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "intermediate_size": geometry.intermediate_size,
        },
        "total_sparsity": total_sparsity,
        "pattern": (recorded or {}).get("pattern") or inferred_pattern(layers, total_sparsity),
        "pattern_measured": inferred_pattern(layers, total_sparsity),
        "pruned_by": (recorded or {}).get("method"),
        "nonfinite": {"tensors": len(nonfinite), "values": sum(nonfinite.values()), "first": next(iter(nonfinite), None)},
        "layers": layers,
    }


def inspect_checkpoint(checkpoint: Checkpoint) -> dict:
    return inspect_model(checkpoint, load_model(checkpoint, check_finite=False))


def recorded_sparsity(checkpoint: Checkpoint) -> dict | None:
    """The checkpoint's sparsity.json, or None when it has none; a broken one is bad input
    (for commands that rely on it: build, recover)."""
    path = checkpoint.path / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"'{path}' is not valid JSON; restore it or re-run `sparsedeploy prune`") from None


def _recorded_sparsity(checkpoint: Checkpoint) -> dict | None:
    """`inspect` shows what the weights hold even when sparsity.json is broken."""
    try:
        return recorded_sparsity(checkpoint)
    except BadInput:
        return None
