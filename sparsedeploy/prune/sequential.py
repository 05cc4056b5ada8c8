"""Layer-by-layer calibration: only one decoder layer's weights and activations are on
the compute device at a time, so peak memory does not grow with depth.

The inputs of layer l+1 are the outputs of layer l after it was pruned, as Wanda and
SparseGPT do, so each layer is calibrated on what it will really see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsedeploy.models.adapters import ArchitectureAdapter, DecoderLayer, LinearSublayer


class _StopForward(Exception):
    pass


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class LayerInputs:
    """The calibration hidden states entering one decoder layer (one tensor per sample,
    kept on the CPU) and the keyword arguments the model passes to each layer (masks,
    rotary embeddings: they differ per layer in models with sliding-window layers)."""

    hidden_states: list[torch.Tensor]
    layer_kwargs: list[dict]


@torch.no_grad()
def capture_first_layer_inputs(adapter: ArchitectureAdapter, samples: torch.Tensor) -> LayerInputs:
    """Run only the embedding part of the model for each sample, and one full forward of
    one sample to record the per-layer keyword arguments (they do not depend on the
    tokens when samples have equal length and no padding)."""
    layers = [layer.module for layer in adapter.decoder_layers()]
    hidden_states: list[torch.Tensor] = []
    layer_kwargs: list[dict] = [{} for _ in layers]

    def stop_at_first(module, args, kwargs):
        hidden_states.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())
        raise _StopForward

    def record_kwargs(index):
        def hook(module, args, kwargs):
            layer_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            layer_kwargs[index]["use_cache"] = False
            layer_kwargs[index].pop("past_key_values", None)
            layer_kwargs[index].pop("past_key_value", None)

        return hook

    handles = [layer.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        adapter.model(input_ids=samples[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    handle = layers[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        for sample in samples:
            try:
                adapter.model(input_ids=sample[None], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden_states, layer_kwargs)


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: str) -> list[torch.Tensor]:
    kwargs = _to_device(kwargs, device)
    return [_layer_output(layer(x.to(device), **kwargs)).detach().cpu() for x in inputs]


@torch.no_grad()
def calibrate_layer(
    layer: DecoderLayer,
    linears: list[LinearSublayer],
    inputs: list[torch.Tensor],
    kwargs: dict,
    device: str,
    make_statistics: Callable[[], object],
) -> tuple[dict[str, object], list[torch.Tensor]]:
    """Feed the calibration inputs through one layer, accumulating per linear sublayer
    the statistics of its inputs (streamed, one sample at a time). Returns them with the
    layer's outputs (before any pruning of this layer)."""
    statistics = {linear.name: make_statistics() for linear in linears}

    def observe(name):
        def hook(module, args, output):
            statistics[name].add(args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [linear.module.register_forward_hook(observe(linear.name)) for linear in linears]
    try:
        outputs = run_layer(layer.module, inputs, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    return statistics, outputs
