"""Architecture adapters: the one place that knows how a causal LM is laid out.

Given a loaded model, an adapter finds the decoder layers, each layer's linear
sublayers and their roles, the attention geometry, the embedding and the LM head.
Everything else (pruning, export, checks) asks the adapter instead of walking
``model.model.layers`` itself. A new architecture is one small class and one
``@register_architecture`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from sparsedeploy.errors import BadInput

# Roles of linear sublayers. Fused projections keep their own role (qkv, gate_up) so
# that structured pruning knows how to slice them.
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down", "fc1", "fc2")
OTHER_ROLE = "other"


@dataclass(frozen=True)
class LinearSublayer:
    name: str  # full module path in the model, e.g. "model.layers.3.self_attn.q_proj"
    local_name: str  # path inside its decoder layer, e.g. "self_attn.q_proj"
    role: str
    layer_index: int
    module: nn.Linear = field(repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)


@dataclass(frozen=True)
class DecoderLayer:
    index: int
    name: str
    module: nn.Module = field(repr=False, compare=False)
    linears: tuple[LinearSublayer, ...]

    def by_role(self, role: str) -> LinearSublayer:
        for linear in self.linears:
            if linear.role == role:
                return linear
        raise KeyError(f"layer {self.index} has no linear sublayer with role '{role}'")


@dataclass(frozen=True)
class AttentionGeometry:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


_REGISTRY: dict[str, type[ArchitectureAdapter]] = {}


def register_architecture(*model_types: str):
    """Class decorator: the adapter handles configs whose ``model_type`` is one of these."""

    def decorate(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        for model_type in model_types:
            _REGISTRY[model_type] = cls
        return cls

    return decorate


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def check_supported(model_type: str | None) -> None:
    if model_type not in _REGISTRY:
        raise BadInput(
            f"architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_model_types())} (open an issue to add an adapter)"
        )


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(model.config, "model_type", None)
    check_supported(model_type)
    return _REGISTRY[model_type](model)


class ArchitectureAdapter:
    """Base adapter. Subclasses only declare ``linear_roles``: the local module names of
    a decoder layer's linear sublayers and the role of each."""

    linear_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config.get_text_config()
        self._layers_name, self._layers = self._find_layer_list()

    # -- structure ---------------------------------------------------------------

    def _find_layer_list(self) -> tuple[str, nn.ModuleList]:
        """The ModuleList of decoder layers: as long as the config says, and every
        element holds the sublayers this architecture declares."""
        depth = self.config.num_hidden_layers
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth and depth > 0:
                if all(self._has_declared_linears(layer) for layer in module):
                    return name, module
        raise BadInput(
            f"could not find {depth} decoder layers with {sorted(self.linear_roles)} in this "
            f"'{self.config.model_type}' model; the checkpoint does not match its config.json "
            "(re-export it with transformers' save_pretrained)"
        )

    def _has_declared_linears(self, layer: nn.Module) -> bool:
        names = dict(layer.named_modules())
        return all(isinstance(names.get(local), nn.Linear) for local in self.linear_roles)

    @property
    def layers_name(self) -> str:
        return self._layers_name

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def decoder_layers(self) -> list[DecoderLayer]:
        return [self.decoder_layer(i) for i in range(len(self._layers))]

    def decoder_layer(self, index: int) -> DecoderLayer:
        layer = self._layers[index]
        layer_name = f"{self._layers_name}.{index}"
        linears = []
        for local_name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                role = self.linear_roles.get(local_name, OTHER_ROLE)
                linears.append(
                    LinearSublayer(f"{layer_name}.{local_name}", local_name, role, index, module)
                )
        return DecoderLayer(index, layer_name, layer, tuple(linears))

    def linear_sublayers(self) -> list[LinearSublayer]:
        """Every linear sublayer of every decoder layer: what pruning touches by
        default (never the embedding or the LM head)."""
        return [linear for layer in self.decoder_layers() for linear in layer.linears]

    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # -- geometry ----------------------------------------------------------------

    def geometry(self) -> AttentionGeometry:
        config = self.config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=self._intermediate_size(),
        )

    def _intermediate_size(self) -> int:
        return self.config.intermediate_size


@register_architecture(
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"
)
class LlamaLikeAdapter(ArchitectureAdapter):
    """Separate q/k/v/o projections and a gated MLP (gate, up, down)."""

    linear_roles = {
        "self_attn.q_proj": "q",
        "self_attn.k_proj": "k",
        "self_attn.v_proj": "v",
        "self_attn.o_proj": "o",
        "mlp.gate_proj": "gate",
        "mlp.up_proj": "up",
        "mlp.down_proj": "down",
    }


@register_architecture("phi3")
class Phi3Adapter(ArchitectureAdapter):
    """Fused qkv and fused gate_up projections."""

    linear_roles = {
        "self_attn.qkv_proj": "qkv",
        "self_attn.o_proj": "o",
        "mlp.gate_up_proj": "gate_up",
        "mlp.down_proj": "down",
    }


@register_architecture("opt")
class OPTAdapter(ArchitectureAdapter):
    linear_roles = {
        "self_attn.q_proj": "q",
        "self_attn.k_proj": "k",
        "self_attn.v_proj": "v",
        "self_attn.out_proj": "o",
        "fc1": "fc1",
        "fc2": "fc2",
    }

    def _intermediate_size(self) -> int:
        return self.config.ffn_dim


@register_architecture("gpt_neox")
class GPTNeoXAdapter(ArchitectureAdapter):
    """Fused query_key_value, interleaved per head (not q|k|v blocks)."""

    linear_roles = {
        "attention.query_key_value": "qkv",
        "attention.dense": "o",
        "mlp.dense_h_to_4h": "fc1",
        "mlp.dense_4h_to_h": "fc2",
    }
