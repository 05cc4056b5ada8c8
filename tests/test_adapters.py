import pytest
from torch import nn

from conftest import make_tiny_model, tiny_configs
from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import (
    ATTENTION_ROLES,
    MLP_ROLES,
    adapter_for,
    check_supported,
    supported_model_types,
)

EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen3": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma3_text": {"q", "k", "v", "o", "gate", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "opt": {"q", "k", "v", "o", "fc1", "fc2"},
    "gpt_neox": {"qkv", "o", "fc1", "fc2"},
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED_ROLES))
def test_adapter_finds_layers_roles_and_geometry(model_type):
    model = make_tiny_model(model_type)
    config = tiny_configs()[model_type]
    adapter = adapter_for(model)

    layers = adapter.decoder_layers()
    assert len(layers) == config.num_hidden_layers == adapter.num_layers
    for index, layer in enumerate(layers):
        assert layer.index == index
        roles = {linear.role for linear in layer.linears}
        assert roles == EXPECTED_ROLES[model_type]
        for linear in layer.linears:
            # The name really addresses the module inside the model.
            assert model.get_submodule(linear.name) is linear.module
            assert isinstance(linear.module, nn.Linear)
            assert linear.role in ATTENTION_ROLES + MLP_ROLES
            assert linear.layer_index == index

    geometry = adapter.geometry()
    assert geometry.hidden_size == config.hidden_size
    assert geometry.num_heads == config.num_attention_heads
    assert geometry.num_kv_heads == (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    assert geometry.head_dim * geometry.num_heads == _q_out_features(layers[0], geometry)
    mlp_in = layers[0].by_role("down" if "down" in EXPECTED_ROLES[model_type] else "fc2").module.in_features
    assert geometry.intermediate_size == mlp_in


def _q_out_features(layer, geometry) -> int:
    """Query width, read from the weights: q_proj, or the q share of a fused qkv."""
    if any(linear.role == "q" for linear in layer.linears):
        return layer.by_role("q").module.out_features
    qkv = layer.by_role("qkv").module.out_features
    return qkv - 2 * geometry.num_kv_heads * geometry.head_dim


@pytest.mark.parametrize("model_type", sorted(EXPECTED_ROLES))
def test_embedding_and_head_are_not_prunable_sublayers(model_type):
    model = make_tiny_model(model_type)
    adapter = adapter_for(model)
    embedding, head = adapter.embedding(), adapter.lm_head()
    assert isinstance(embedding, nn.Embedding)
    assert head.weight.shape[0] == tiny_configs()[model_type].vocab_size
    sublayer_modules = {id(linear.module) for linear in adapter.linear_sublayers()}
    assert id(head) not in sublayer_modules and id(embedding) not in sublayer_modules


def test_every_architecture_of_the_brief_is_supported():
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "gemma3_text", "phi3", "opt", "gpt_neox"):
        assert model_type in supported_model_types()


def test_unsupported_architecture_names_itself_and_the_supported_list():
    with pytest.raises(BadInput) as error:
        check_supported("gpt2")
    message = str(error.value)
    assert "'gpt2'" in message and "llama" in message and "gpt_neox" in message
    assert "\n" not in message


def test_unregistered_linear_sublayers_are_kept_with_role_other():
    model = make_tiny_model("llama")
    adapter = adapter_for(model)
    # An extra projection that no adapter declares is still found, never silently skipped.
    adapter.decoder_layers()[0].module.extra_proj = nn.Linear(8, 8)
    roles = [linear.role for linear in adapter.decoder_layer(0).linears]
    assert roles.count("other") == 1


def test_mismatched_structure_is_a_clear_error():
    model = make_tiny_model("llama")
    del model.model.layers[0].self_attn.q_proj
    with pytest.raises(BadInput, match="decoder layers"):
        adapter_for(model)
