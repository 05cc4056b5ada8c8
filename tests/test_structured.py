"""Structured pruning on tiny random models: dropped layers and removed head groups /
FFN channels give smaller models that compute what the dense model computes without
them, save, load back with from_pretrained and generate with the KV cache."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, make_tiny_model, save_checkpoint
from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.structured import (
    block_importance,
    choose_layers_to_drop,
    count_parameters,
    drop_decoder_layers,
    prune_depth,
    prune_width,
    remove_width,
    width_importance,
)

DEPTH_TYPES = ["llama", "qwen3", "gemma3_text", "phi3", "opt", "gpt_neox"]
WIDTH_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3"]


def _samples(seed: int = 0, n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, samples: torch.Tensor) -> torch.Tensor:
    return model(input_ids=samples, use_cache=False).logits


def _reload_and_generate(model, directory, samples):
    """Save, load back, check the loaded model computes the same, and that greedy
    generation with the KV cache equals generation without it (a wrong per-layer
    cache index or head count shows up here)."""
    save_checkpoint(model, directory)
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert torch.allclose(_logits(loaded, samples), _logits(model, samples), atol=1e-5)
    prompt = samples[:1, :8]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = loaded.generate(prompt, use_cache=True, **kwargs)
        uncached = loaded.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)
    return loaded


def _four_layer_gemma3():
    """Mixed sliding/full layers with a window shorter than the samples, so a layer
    that got another layer's type (mask) would compute something else."""
    import transformers as t

    torch.manual_seed(0)
    config = t.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 4}, intermediate_size=128, num_key_value_heads=2, head_dim=16,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    config.eos_token_id = config.bos_token_id = 0
    return AutoModelForCausalLM.from_config(config).eval()


# -- depth ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", DEPTH_TYPES)
def test_block_importance_one_value_per_layer_in_unit_range(model_type):
    model = make_tiny_model(model_type)
    importance = block_importance(adapter_for(model), _samples())
    assert len(importance) == model.config.num_hidden_layers
    assert all(0.0 <= value <= 1.0 for value in importance)
    assert all(value > 0.0 for value in importance)  # random layers do change the stream


def _skip_layers_reference(model, skipped: list[int], samples):
    """The original model with the skipped layers replaced by the identity."""
    layers = [layer.module for layer in adapter_for(model).decoder_layers()]

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        return _logits(model, samples)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model_type", DEPTH_TYPES)
def test_dropping_the_least_important_layer_equals_skipping_it(model_type, tmp_path):
    original = make_tiny_model(model_type)
    model = copy.deepcopy(original)
    samples = _samples()
    record = prune_depth(model, adapter_for(model), samples, n=1)

    assert record["dropped_layers"] == [min(range(2), key=lambda i: record["importance"][i])]
    assert record["num_layers"] == {"before": 2, "after": 1}
    assert record["parameters"]["after"] < record["parameters"]["before"] == count_parameters(original)
    assert model.config.num_hidden_layers == 1
    assert adapter_for(model).num_layers == 1
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            assert module.layer_idx == 0
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 1
    reference = _skip_layers_reference(original, record["dropped_layers"], samples)
    assert torch.allclose(_logits(model, samples), reference, atol=1e-5)

    loaded = _reload_and_generate(model, tmp_path / "dropped", samples)
    assert loaded.config.num_hidden_layers == 1


def test_dropping_middle_layers_keeps_each_layers_type_and_cache_slot(tmp_path):
    original = _four_layer_gemma3()
    model = copy.deepcopy(original)
    adapter = adapter_for(model)
    samples = _samples(length=12)
    kept = drop_decoder_layers(model, adapter, [0, 2])

    assert kept == [1, 3]
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert [layer.module.self_attn.layer_idx for layer in adapter.decoder_layers()] == [0, 1]
    assert torch.allclose(_logits(model, samples), _skip_layers_reference(original, [0, 2], samples), atol=1e-5)
    _reload_and_generate(model, tmp_path / "dropped", samples)

    model = copy.deepcopy(original)
    drop_decoder_layers(model, adapter_for(model), [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert torch.allclose(_logits(model, samples), _skip_layers_reference(original, [1], samples), atol=1e-5)
    _reload_and_generate(model, tmp_path / "dropped-1", samples)


def test_choose_layers_to_drop_takes_the_least_important():
    assert choose_layers_to_drop([0.3, 0.1, 0.2, 0.05], 2) == [1, 3]
    assert choose_layers_to_drop([0.2, 0.2, 0.3], 1) == [0]


@pytest.mark.parametrize("n", [0, -1, 2, 3])
def test_depth_refuses_to_drop_all_or_nothing(n):
    with pytest.raises(BadInput, match="decoder layers"):
        choose_layers_to_drop([0.1, 0.2], n)
    model = make_tiny_model("llama")
    with pytest.raises(BadInput, match="decoder layers"):
        prune_depth(model, adapter_for(model), _samples(), n)


def test_drop_decoder_layers_rejects_bad_indices():
    model = make_tiny_model("llama")
    adapter = adapter_for(model)
    for indices in ([0, 1], [2], [], [-1]):
        with pytest.raises(BadInput, match="cannot drop layers"):
            drop_decoder_layers(model, adapter, indices)
    assert model.config.num_hidden_layers == 2 and adapter.num_layers == 2


# -- width ------------------------------------------------------------------------


def _masked_reference(original, removed_groups, removed_channels, samples):
    """The dense model with the removed heads' o-projection input columns and the
    removed channels' down-projection input columns zeroed: what removing them must
    compute (a removed KV group's k/v only feed its own query heads)."""
    model = copy.deepcopy(original)
    geometry = adapter_for(model).geometry()
    per_group = geometry.num_heads // geometry.num_kv_heads
    with torch.no_grad():
        for layer, groups, channels in zip(adapter_for(model).decoder_layers(), removed_groups, removed_channels):
            for g in groups:
                width = per_group * geometry.head_dim
                layer.by_role("o").module.weight[:, g * width:(g + 1) * width] = 0
            for c in channels:
                layer.by_role("down").module.weight[:, c] = 0
    return _logits(model, samples)


@pytest.mark.parametrize("model_type", WIDTH_TYPES)
def test_prune_width_shrinks_tensors_and_computes_the_masked_model(model_type, tmp_path):
    original = make_tiny_model(model_type)
    model = copy.deepcopy(original)
    before = adapter_for(original).geometry()
    samples = _samples()
    record = prune_width(model, adapter_for(model), samples, heads_fraction=0.5, ffn_fraction=0.25)

    per_group = before.num_heads // before.num_kv_heads
    new_kv = max(1, before.num_kv_heads - round(0.5 * before.num_kv_heads))
    new_heads, new_size, hd = new_kv * per_group, before.intermediate_size - 32, before.head_dim
    assert record["kv_groups"]["kept"] == new_kv
    assert record["attention_heads"]["after"] == new_heads
    assert record["intermediate_size"]["after"] == new_size
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert count_parameters(model) == record["parameters"]["after"]
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (
        new_heads, new_kv, hd, new_size)
    geometry = adapter_for(model).geometry()
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (new_heads, new_kv, hd)

    for layer in adapter_for(model).decoder_layers():
        shapes = {linear.role: linear.shape for linear in layer.linears}
        assert shapes["o"] == (before.hidden_size, new_heads * hd)
        assert shapes["down"] == (before.hidden_size, new_size)
        if "qkv" in shapes:
            assert shapes["qkv"] == ((new_heads + 2 * new_kv) * hd, before.hidden_size)
            assert shapes["gate_up"] == (2 * new_size, before.hidden_size)
        else:
            assert shapes["q"] == (new_heads * hd, before.hidden_size)
            assert shapes["k"] == shapes["v"] == (new_kv * hd, before.hidden_size)
            assert shapes["gate"] == shapes["up"] == (new_size, before.hidden_size)
        for linear in layer.linears:
            if linear.module.bias is not None:
                assert linear.module.bias.shape == (linear.shape[0],)
        record_layer = record["layers"][layer.index]
        assert len(record_layer["removed_kv_groups"]) == before.num_kv_heads - new_kv
        assert len(record_layer["removed_ffn_channels"]) == 32

    removed_groups = [entry["removed_kv_groups"] for entry in record["layers"]]
    removed_channels = [entry["removed_ffn_channels"] for entry in record["layers"]]
    reference = _masked_reference(original, removed_groups, removed_channels, samples)
    assert torch.allclose(_logits(model, samples), reference, atol=1e-5)

    loaded = _reload_and_generate(model, tmp_path / "narrow", samples)
    assert loaded.config.num_key_value_heads == new_kv
    assert count_parameters(loaded) == record["parameters"]["after"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_width_with_nothing_removed_leaves_logits_unchanged(model_type):
    original = make_tiny_model(model_type)
    samples = _samples()
    model = copy.deepcopy(original)
    record = prune_width(model, adapter_for(model), samples, heads_fraction=0.0, ffn_fraction=0.0)
    assert record["parameters"]["after"] == record["parameters"]["before"]
    assert torch.equal(_logits(model, samples), _logits(original, samples))
    # The slicing path itself with empty removals: new modules, same numbers.
    model = copy.deepcopy(original)
    remove_width(model, adapter_for(model), [[], []], [[], []])
    assert torch.equal(_logits(model, samples), _logits(original, samples))


def test_gqa_groups_are_removed_whole():
    original = make_tiny_model("llama")  # 4 query heads, 2 kv heads: groups {q0,q1,kv0}, {q2,q3,kv1}
    model = copy.deepcopy(original)
    remove_width(model, adapter_for(model), [[1], [0]], [[], []])
    hd = 16
    for index, kept_group in ((0, 0), (1, 1)):
        old, new = adapter_for(original).decoder_layer(index), adapter_for(model).decoder_layer(index)
        q_rows = slice(kept_group * 2 * hd, (kept_group + 1) * 2 * hd)
        kv_rows = slice(kept_group * hd, (kept_group + 1) * hd)
        assert torch.equal(new.by_role("q").module.weight, old.by_role("q").module.weight[q_rows])
        assert torch.equal(new.by_role("k").module.weight, old.by_role("k").module.weight[kv_rows])
        assert torch.equal(new.by_role("v").module.weight, old.by_role("v").module.weight[kv_rows])
        assert torch.equal(new.by_role("o").module.weight, old.by_role("o").module.weight[:, q_rows])
        attention = new.module.self_attn
        assert attention.num_key_value_groups == 2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)


def _change(model, samples, reference) -> float:
    return float((_logits(model, samples) - reference).pow(2).mean())


def test_removing_the_least_important_changes_logits_less_than_the_most_important():
    import transformers as t

    torch.manual_seed(0)
    config = t.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=4)  # 4 groups of one head
    original = AutoModelForCausalLM.from_config(config).eval()
    samples = _samples()
    reference = _logits(original, samples)
    scores = width_importance(adapter_for(original), samples)
    no_channels = [[] for _ in scores]

    def pruned(groups, channels):
        model = copy.deepcopy(original)
        remove_width(model, adapter_for(model), groups, channels)
        return model

    least = [s["groups"].argsort()[:2].tolist() for s in scores]
    most = [s["groups"].argsort(descending=True)[:2].tolist() for s in scores]
    assert _change(pruned(least, no_channels), samples, reference) < _change(pruned(most, no_channels), samples, reference)

    no_groups = [[] for _ in scores]
    least = [s["channels"].argsort()[:64].tolist() for s in scores]
    most = [s["channels"].argsort(descending=True)[:64].tolist() for s in scores]
    assert _change(pruned(no_groups, least), samples, reference) < _change(pruned(no_groups, most), samples, reference)


@pytest.mark.parametrize("model_type", ["opt", "gpt_neox"])
def test_width_on_unsupported_architectures_names_the_supported_ones(model_type):
    model = make_tiny_model(model_type)
    with pytest.raises(BadInput, match="supported model types: .*llama.*; use depth pruning"):
        prune_width(model, adapter_for(model), _samples(), heads_fraction=0.25, ffn_fraction=0.25)


@pytest.mark.parametrize("fractions", [(1.0, 0.0), (0.0, 1.0), (-0.1, 0.0), (0.0, 2)])
def test_width_fractions_must_be_a_share_removed(fractions):
    model = make_tiny_model("llama")
    with pytest.raises(BadInput, match="share removed"):
        prune_width(model, adapter_for(model), _samples(), *fractions)


def test_width_always_keeps_one_group_and_one_channel():
    model = make_tiny_model("llama")
    record = prune_width(model, adapter_for(model), _samples(), heads_fraction=0.99, ffn_fraction=0.999)
    assert record["kv_groups"]["kept"] == 1 and record["intermediate_size"]["after"] == 1
    assert _logits(model, _samples()).isfinite().all()


# -- the importance functions against a slow, obvious computation -------------------


def _record_layer_io(model, samples):
    """Every decoder layer's input and output hidden states, from full forwards."""
    layers = [layer.module for layer in adapter_for(model).decoder_layers()]
    io = [[] for _ in layers]

    def hook(index):
        def record(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            io[index].append((hidden[0].clone(), (output[0] if isinstance(output, tuple) else output)[0].clone()))

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return io


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_block_importance_matches_a_token_by_token_computation(model_type):
    model = make_tiny_model(model_type)
    samples = _samples(n=2, length=8)
    expected = []
    for pairs in _record_layer_io(model, samples):
        distances = []
        for x, y in pairs:
            for a, b in zip(x.double().tolist(), y.double().tolist()):
                dot = sum(p * q for p, q in zip(a, b))
                cosine = dot / math.sqrt(sum(p * p for p in a)) / math.sqrt(sum(q * q for q in b))
                distances.append(math.acos(max(-1.0, min(1.0, cosine))) / math.pi)
        expected.append(sum(distances) / len(distances))
    assert block_importance(adapter_for(model), samples) == pytest.approx(expected, rel=1e-6)


def test_width_importance_matches_a_column_by_column_computation():
    model = make_tiny_model("llama")  # 4 heads of 16, 2 kv heads: group g = o input columns 32g..32g+31
    samples = _samples(n=2, length=8)
    adapter = adapter_for(model)
    captured = {}

    def hook(name):
        def record(module, args):
            captured.setdefault(name, []).extend(args[0].reshape(-1, args[0].shape[-1]).double().tolist())

        return record

    handles = []
    for layer in adapter.decoder_layers():
        for role in ("o", "down"):
            handles.append(layer.by_role(role).module.register_forward_pre_hook(hook((layer.index, role))))
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample[None], use_cache=False)
    for handle in handles:
        handle.remove()

    scores = width_importance(adapter, samples)
    assert len(scores) == 2
    for index, layer_scores in enumerate(scores):
        o_rows, down_rows = captured[(index, "o")], captured[(index, "down")]
        assert len(o_rows) == 16  # tokens
        groups = [math.sqrt(sum(row[c] ** 2 for row in o_rows for c in range(32 * g, 32 * g + 32))) for g in range(2)]
        channels = [math.sqrt(sum(row[c] ** 2 for row in down_rows)) for c in range(128)]
        assert layer_scores["groups"].tolist() == pytest.approx(groups, rel=1e-6)
        assert layer_scores["channels"].tolist() == pytest.approx(channels, rel=1e-6)
