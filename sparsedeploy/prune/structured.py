"""Structured pruning that really shrinks the model: fewer decoder layers (depth) and
fewer attention head groups / FFN channels per layer (width).

Unlike unstructured or N:M pruning, which only zero weights, the result has smaller
tensors and a matching config, so any engine runs it faster without sparse kernels.

Both kinds score what to remove from calibration activations gathered in one
sequential pass over the dense model (``sequential.py``: one decoder layer on the
compute device at a time, the inputs of layer l+1 are the outputs of layer l):

* depth: a layer whose output hidden states point the same way as its inputs does
  little (angular distance, Gromov et al. "The Unreasonable Ineffectiveness of the
  Deeper Layers"; ShortGPT's block influence 1 - cos is the same ordering);
* width: a head group or FFN channel whose activations entering the output projection
  are small contributes little (Minitron's activation-based importance).

Layers and sublayers are always found through the architecture adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import (
    ArchitectureAdapter,
    DecoderLayer,
    LlamaLikeAdapter,
    Phi3Adapter,
)
from sparsedeploy.prune.methods import InputSquareNorms
from sparsedeploy.prune.sequential import calibrate_layer, capture_first_layer_inputs, run_layer

# Config lists with one entry per decoder layer, beyond names ending in "layer_types".
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
# Attributes through which a module knows its position in the layer stack (KV cache slot).
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_index", "layer_id")
# Adapters whose width pruning is implemented (separate q/k/v with gate/up/down, and
# Phi-3's fused qkv and gate_up). OPT and GPT-NeoX derive head_dim from
# hidden_size / num_heads when loading, so a checkpoint with fewer heads cannot load.
WIDTH_ADAPTERS = (LlamaLikeAdapter, Phi3Adapter)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- depth ------------------------------------------------------------------------


def angular_distance(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per token arccos(cos(x, f(x))) / pi, in [0, 1]: 0 when the layer only rescales
    its input, which is what makes it redundant in the residual stream."""
    a = inputs.reshape(-1, inputs.shape[-1]).double()
    b = outputs.reshape(-1, outputs.shape[-1]).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def block_importance(adapter: ArchitectureAdapter, samples: torch.Tensor, device: str = "cpu") -> list[float]:
    """Mean angular distance between each decoder layer's input and output hidden
    states over all calibration tokens, from one sequential pass over the dense model.
    Lower means the layer changes the residual stream less: less important."""
    _check_samples(samples)
    inputs = capture_first_layer_inputs(adapter, samples)
    hidden = inputs.hidden_states
    importance = []
    for layer in adapter.decoder_layers():
        layer.module.to(device)
        outputs = run_layer(layer.module, hidden, inputs.layer_kwargs[layer.index], device)
        layer.module.to("cpu")
        distances = torch.cat([angular_distance(x, y) for x, y in zip(hidden, outputs)])
        importance.append(float(distances.mean()))
        hidden = outputs
    return importance


def _check_drop_count(n: int, total: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < total:
        raise BadInput(
            f"cannot drop {n} of {total} decoder layers; give a whole number from 1 to {total - 1}"
        )


def choose_layers_to_drop(importance: Sequence[float], n: int) -> list[int]:
    """The n least important layers (ties: the earlier layer), ascending. Never all."""
    total = len(importance)
    _check_drop_count(n, total)
    order = sorted(range(total), key=lambda i: (importance[i], i))
    return sorted(order[:n])


def drop_decoder_layers(model: nn.Module, adapter: ArchitectureAdapter, indices: Sequence[int]) -> list[int]:
    """Remove decoder layers in place and keep the model self-consistent: the layer
    ModuleList, each remaining layer's index (the KV cache slot it writes to), the
    config's layer count and per-layer lists. Returns the original indices kept."""
    if adapter.model is not model:
        raise ValueError("the adapter belongs to a different model")
    total = adapter.num_layers
    dropped = sorted(set(int(i) for i in indices))
    if not dropped or dropped[0] < 0 or dropped[-1] >= total or len(dropped) >= total:
        raise BadInput(
            f"cannot drop layers {list(indices)} of a {total}-layer model; give distinct "
            f"indices from 0 to {total - 1}, at least one and at most {total - 1}"
        )
    kept = [i for i in range(total) if i not in dropped]
    layer_list = model.get_submodule(adapter.layers_name)
    kept_modules = [layer_list[i] for i in kept]
    del layer_list[:]
    layer_list.extend(kept_modules)
    for new_index, module in enumerate(kept_modules):
        for submodule in module.modules():
            for attribute in LAYER_INDEX_ATTRIBUTES:
                if isinstance(getattr(submodule, attribute, None), int):
                    setattr(submodule, attribute, new_index)

    config = adapter.config
    for key, value in list(vars(config).items()):
        per_layer = key in PER_LAYER_CONFIG_LISTS or key.endswith("layer_types")
        if per_layer and isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return kept


def prune_depth(
    model: nn.Module, adapter: ArchitectureAdapter, samples: torch.Tensor, n: int, device: str = "cpu"
) -> dict:
    """Score every layer, drop the n least important. Returns the sparsity.json record."""
    _check_drop_count(n, adapter.num_layers)  # before the calibration pass, not after
    parameters_before = count_parameters(model)
    importance = block_importance(adapter, samples, device)
    dropped = choose_layers_to_drop(importance, n)
    kept = drop_decoder_layers(model, adapter, dropped)
    return {
        "kind": "depth",
        "importance_metric": "mean angular distance arccos(cos(input, output)) / pi per token",
        "importance": importance,
        "dropped_layers": dropped,
        "kept_layers": kept,
        "num_layers": {"before": len(importance), "after": len(kept)},
        "parameters": {"before": parameters_before, "after": count_parameters(model)},
    }


# -- width ------------------------------------------------------------------------


def _ffn_out_role(layer: DecoderLayer) -> str:
    roles = {linear.role for linear in layer.linears}
    return "down" if "down" in roles else "fc2"


@torch.no_grad()
def width_importance(
    adapter: ArchitectureAdapter, samples: torch.Tensor, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, from one sequential pass over the dense model:

    * ``groups`` [num_kv_heads]: the L2 norm over tokens of the output projection's
      input restricted to one KV group's columns (its query heads' outputs), since a
      GQA group (one kv head and the query heads sharing it) is removed whole;
    * ``channels`` [intermediate_size]: the L2 norm over tokens of each input channel
      of the FFN's output projection (down / fc2).
    """
    _check_samples(samples)
    geometry = adapter.geometry()
    group_width = geometry.num_heads // geometry.num_kv_heads * geometry.head_dim
    inputs = capture_first_layer_inputs(adapter, samples)
    hidden = inputs.hidden_states
    scores = []
    for layer in adapter.decoder_layers():
        o_proj, ffn_out = layer.by_role("o"), layer.by_role(_ffn_out_role(layer))
        layer.module.to(device)
        norms, hidden = calibrate_layer(
            layer, [o_proj, ffn_out], hidden, inputs.layer_kwargs[layer.index], device, InputSquareNorms
        )
        layer.module.to("cpu")
        o_sq = norms[o_proj.name].value.cpu()
        scores.append({
            "groups": o_sq.reshape(geometry.num_kv_heads, group_width).sum(dim=1).sqrt(),
            "channels": norms[ffn_out.name].value.cpu().sqrt(),
        })
    return scores


def _removal_count(fraction: float, total: int) -> int:
    """round(fraction * total), but always keeping at least one."""
    return min(int(math.floor(fraction * total + 0.5)), total - 1)


def _check_fraction(name: str, fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise BadInput(f"{name} {fraction!r} must be the share removed, from 0 up to (not including) 1, e.g. 0.25")


def _check_samples(samples: torch.Tensor) -> None:
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.numel() == 0:
        raise BadInput("calibration samples must be a non-empty [n, seqlen] tensor of token ids")


def width_supported_model_types() -> list[str]:
    """Model types whose registered adapter is one of WIDTH_ADAPTERS."""
    from sparsedeploy.models import adapters

    return sorted(t for t, cls in adapters._REGISTRY.items() if issubclass(cls, WIDTH_ADAPTERS))


def check_width_supported(adapter: ArchitectureAdapter) -> None:
    if not isinstance(adapter, WIDTH_ADAPTERS):
        raise BadInput(
            f"width pruning does not support '{adapter.config.model_type}' (it derives the head size from "
            f"hidden_size / num_heads, so a model with fewer heads would not load); supported model types: "
            f"{', '.join(width_supported_model_types())}; use depth pruning (dropping layers) for this model"
        )


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a [heads * head_dim] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear holding the kept output rows / input columns."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        bias = bias[rows.to(weight.device)] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _replace(layer: DecoderLayer, local_name: str, new: nn.Linear) -> None:
    parent_name, _, child = local_name.rpartition(".")
    parent = layer.module.get_submodule(parent_name) if parent_name else layer.module
    setattr(parent, child, new)


def _kept(total: int, removed: Sequence[int]) -> torch.Tensor:
    removed_set = set(int(i) for i in removed)
    return torch.tensor([i for i in range(total) if i not in removed_set], dtype=torch.long)


@torch.no_grad()
def remove_width(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    removed_groups: Sequence[Sequence[int]],
    removed_channels: Sequence[Sequence[int]],
) -> None:
    """Remove the given KV groups and FFN channels (per layer, the same count in every
    layer, since the config has one head count and one intermediate size) by replacing
    the projections with smaller nn.Linear modules, then update the config and the
    counts the attention and MLP modules keep."""
    if adapter.model is not model:
        raise ValueError("the adapter belongs to a different model")
    check_width_supported(adapter)
    geometry = adapter.geometry()
    kv, hd = geometry.num_kv_heads, geometry.head_dim
    per_group = geometry.num_heads // kv
    size = geometry.intermediate_size
    layers = adapter.decoder_layers()
    if len(removed_groups) != len(layers) or len(removed_channels) != len(layers):
        raise ValueError("give one list of removed groups and one of removed channels per decoder layer")
    group_counts = {len(set(g)) for g in removed_groups}
    channel_counts = {len(set(c)) for c in removed_channels}
    if len(group_counts) != 1 or len(channel_counts) != 1:
        raise ValueError("every layer must lose the same number of groups and of channels")
    for groups, channels in zip(removed_groups, removed_channels):
        if any(not 0 <= g < kv for g in groups) or any(not 0 <= c < size for c in channels):
            raise ValueError("removed group or channel index out of range")
    new_kv, new_size = kv - group_counts.pop(), size - channel_counts.pop()
    if new_kv < 1 or new_size < 1:
        raise ValueError("at least one KV group and one FFN channel must remain")
    new_heads = new_kv * per_group

    for layer, groups, channels in zip(layers, removed_groups, removed_channels):
        kept_kv = _kept(kv, groups)
        kept_q = (kept_kv[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
        q_rows, kv_rows = _head_rows(kept_q, hd), _head_rows(kept_kv, hd)
        kept_c = _kept(size, channels)
        roles = {linear.role: linear for linear in layer.linears}
        if "qkv" in roles:  # Phi-3: [q (heads*hd) | k (kv*hd) | v (kv*hd)] along rows
            q_size, kv_size = geometry.num_heads * hd, kv * hd
            rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
            _replace(layer, roles["qkv"].local_name, _sliced_linear(roles["qkv"].module, rows=rows))
        else:
            _replace(layer, roles["q"].local_name, _sliced_linear(roles["q"].module, rows=q_rows))
            for role in ("k", "v"):
                _replace(layer, roles[role].local_name, _sliced_linear(roles[role].module, rows=kv_rows))
        _replace(layer, roles["o"].local_name, _sliced_linear(roles["o"].module, cols=q_rows))
        if "gate_up" in roles:  # Phi-3: [gate (size) | up (size)] along rows
            rows = torch.cat([kept_c, size + kept_c])
            _replace(layer, roles["gate_up"].local_name, _sliced_linear(roles["gate_up"].module, rows=rows))
        else:
            for role in ("gate", "up"):
                _replace(layer, roles[role].local_name, _sliced_linear(roles[role].module, rows=kept_c))
        _replace(layer, roles["down"].local_name, _sliced_linear(roles["down"].module, cols=kept_c))

        attention = layer.module.get_submodule(roles["o"].local_name.rpartition(".")[0])
        for attribute, value in (
            ("num_heads", new_heads),
            ("num_attention_heads", new_heads),
            ("num_key_value_heads", new_kv),
            ("num_key_value_groups", per_group),
        ):
            if isinstance(getattr(attention, attribute, None), int):
                setattr(attention, attribute, value)
        mlp = layer.module.get_submodule(roles["down"].local_name.rpartition(".")[0])
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = new_size

    config = adapter.config
    config.num_attention_heads = new_heads
    config.num_key_value_heads = new_kv
    config.head_dim = hd  # hidden_size // num_attention_heads no longer gives it
    config.intermediate_size = new_size


def prune_width(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    samples: torch.Tensor,
    heads_fraction: float,
    ffn_fraction: float,
    device: str = "cpu",
) -> dict:
    """Remove the least important share of KV groups and of FFN channels in every
    layer (the same counts everywhere; at least one of each kept). Fractions are the
    share removed. Returns the sparsity.json record."""
    _check_fraction("heads_fraction", heads_fraction)
    _check_fraction("ffn_fraction", ffn_fraction)
    check_width_supported(adapter)
    geometry = adapter.geometry()
    n_groups = _removal_count(heads_fraction, geometry.num_kv_heads)
    n_channels = _removal_count(ffn_fraction, geometry.intermediate_size)
    parameters_before = count_parameters(model)
    layers: list[dict] = []
    if n_groups or n_channels:
        scores = width_importance(adapter, samples, device)
        removed_groups = [sorted(s["groups"].argsort(stable=True)[:n_groups].tolist()) for s in scores]
        removed_channels = [sorted(s["channels"].argsort(stable=True)[:n_channels].tolist()) for s in scores]
        remove_width(model, adapter, removed_groups, removed_channels)
        layers = [
            {
                "index": i,
                "group_importance": s["groups"].tolist(),
                "removed_kv_groups": g,
                "removed_ffn_channels": c,
            }
            for i, (s, g, c) in enumerate(zip(scores, removed_groups, removed_channels))
        ]
    per_group = geometry.num_heads // geometry.num_kv_heads
    return {
        "kind": "width",
        "importance_metric": "L2 norm over tokens of the o / down projection inputs per KV group / channel",
        "heads_fraction": heads_fraction,
        "ffn_fraction": ffn_fraction,
        "kv_groups": {"before": geometry.num_kv_heads, "removed": n_groups, "kept": geometry.num_kv_heads - n_groups},
        "attention_heads": {"before": geometry.num_heads, "after": (geometry.num_kv_heads - n_groups) * per_group},
        "head_dim": geometry.head_dim,
        "intermediate_size": {
            "before": geometry.intermediate_size,
            "removed": n_channels,
            "after": geometry.intermediate_size - n_channels,
        },
        "parameters": {"before": parameters_before, "after": count_parameters(model)},
        "layers": layers,
    }
