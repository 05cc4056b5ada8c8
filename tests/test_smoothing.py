"""SmoothQuant (sparsedeploy/export/smoothing.py): the factors on small tensors, the
groups found from tiny models of several architectures, and the copy computing the same."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from sparsedeploy.errors import BadInput
from sparsedeploy.export.smoothing import smoothed_copy, smoothing_groups, smoothing_scales, smoothquant_alpha
from sparsedeploy.kernels.semi_structured import named_linears


def test_smoothquant_alpha_from_the_profile():
    assert smoothquant_alpha(None) == 0.5 and smoothquant_alpha(0.8) == 0.8 and smoothquant_alpha(1) == 1.0
    assert smoothquant_alpha(False) is None
    for wrong in (True, 1.5, "0.5"):
        with pytest.raises(BadInput, match="smoothquant_alpha"):
            smoothquant_alpha(wrong)


def test_smoothing_scales_balance_activation_and_weight_ranges():
    activation, weight = torch.tensor([4.0, 0.0, 1.0, 9.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert smoothing_scales(activation, weight, 0.5).tolist() == [2.0, 1.0, 1.0, 3.0]  # unused channels keep 1
    assert smoothing_scales(activation, weight, 1.0).tolist() == [4.0, 1.0, 1.0, 9.0]
    # After smoothing, channel j's activation range is a/s and its weight range w*s: equal at alpha 0.5.
    scales = smoothing_scales(torch.tensor([100.0, 0.5]), torch.tensor([0.01, 2.0]), 0.5)
    assert torch.allclose(torch.tensor([100.0, 0.5]) / scales, torch.tensor([0.01, 2.0]) * scales)
    with pytest.raises(BadInput, match="smoothquant_alpha"):
        smoothing_scales(activation, weight, 1.5)


def test_smoothing_groups_are_found_from_the_running_model():
    model = make_tiny_model("llama")
    groups = smoothing_groups(model, torch.arange(8), named_linears(model))
    by_producer = {g.producer: sorted(name.rsplit(".", 1)[1] for name in g.linears) for g in groups if g.producer}
    assert by_producer["model.layers.0.input_layernorm"] == ["k_proj", "q_proj", "v_proj"]
    assert by_producer["model.layers.1.post_attention_layernorm"] == ["gate_proj", "up_proj"]
    assert len(by_producer) == 4  # two norms per layer; o_proj and down_proj read no module's output
    assert sum(len(g.linears) for g in groups) == 14 and all(not m._forward_hooks for m in model.modules())


def test_smoothed_copy_computes_the_same_keeps_2of4_and_leaves_the_model_alone():
    from sparsedeploy.prune.masks import nm_mask
    from sparsedeploy.prune.patterns import nm_compliance, parse_nm

    model = make_tiny_model("llama")
    for _, linear in named_linears(model):
        linear.weight.data.mul_(nm_mask(linear.weight.data.abs(), parse_nm("2:4")))
    # An outlier channel in the attention norm's output, as real checkpoints have.
    model.model.layers[0].input_layernorm.weight.data[5] = 40.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    smoothed, record = smoothed_copy(model, windows, named_linears(model), 0.5)

    assert record["groups_smoothed"] == 4 and record["linears_smoothed"] == 10 and record["not_foldable"] == []
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert smoothed.model.embed_tokens.weight is model.model.embed_tokens.weight  # untouched weights are shared
    with torch.no_grad():
        torch.testing.assert_close(smoothed(windows).logits, model(windows).logits, rtol=1e-4, atol=1e-4)
    q_proj = smoothed.model.layers[0].self_attn.q_proj.weight
    assert nm_compliance(q_proj, parse_nm("2:4")) == 1.0 and not torch.equal(q_proj, before["model.layers.0.self_attn.q_proj.weight"])
    # The outlier moved into the weights: q_proj's input range is now far narrower.
    from sparsedeploy.export.smoothing import channel_ranges

    name = "model.layers.0.self_attn.q_proj"
    original = channel_ranges(model, windows, named_linears(model))[name]
    flattened = channel_ranges(smoothed, windows, named_linears(smoothed))[name]
    assert float(flattened.max() / flattened.median()) < float(original.max() / original.median()) / 4


def test_a_smoothing_that_changes_the_model_is_refused():
    from sparsedeploy.export.smoothing import _check_same_function

    model = make_tiny_model("llama")
    window = torch.arange(16)
    _check_same_function(model, model, window)
    with pytest.raises(BadInput, match="smoothquant_alpha = false"):
        _check_same_function(model, make_tiny_model("llama", seed=1), window)


@pytest.mark.parametrize("model_type, groups, not_foldable", [
    ("gemma", 4, 0),  # its norms scale by (1 + weight): folded in that form
    ("opt", 4, 2),  # LayerNorm with a bias; fc2 reads the activation function's output
    ("phi3", 4, 0),  # fused qkv_proj and gate_up_proj: one linear per group
])
def test_smoothing_folds_each_norm_form_and_leaves_what_cannot_take_it(model_type, groups, not_foldable):
    model = make_tiny_model(model_type)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    smoothed, record = smoothed_copy(model, windows, named_linears(model), 0.5)
    assert record["groups_smoothed"] == groups and len(record["not_foldable"]) == not_foldable
    with torch.no_grad():
        torch.testing.assert_close(smoothed(windows).logits, model(windows).logits, rtol=1e-4, atol=1e-4)
