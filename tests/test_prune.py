"""The pruning engine on tiny random models: layer-by-layer calibration reproduces the
model, every method hits its pattern exactly, and `prune` writes a loadable checkpoint."""

import json
import pytest
import torch

from conftest import EXPECTED_ROLES_ALL, make_tiny_model, run_cli, tree_fingerprint
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.methods import SparsityTarget, Wanda, get_method, method_names
from sparsedeploy.prune.patterns import nm_compliance, parse_nm, zero_fraction
from sparsedeploy.prune.run import PruneRequest, prune_model
from sparsedeploy.prune.sequential import capture_first_layer_inputs, run_layer


@pytest.mark.parametrize("model_type", EXPECTED_ROLES_ALL)
def test_layer_by_layer_reproduces_the_full_forward(model_type):
    model = make_tiny_model(model_type)
    adapter = adapter_for(model)
    samples = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs = capture_first_layer_inputs(adapter, samples)
    with torch.no_grad():
        reference = [model(input_ids=s[None], output_hidden_states=True).hidden_states for s in samples]
    hidden = inputs.hidden_states
    for index in range(adapter.num_layers):
        for sample, h in enumerate(hidden):
            assert torch.allclose(h, reference[sample][index], atol=1e-5), (model_type, index)
        hidden = run_layer(adapter.decoder_layer(index).module, hidden, inputs.layer_kwargs[index], "cpu")


class RecordingWanda(Wanda):
    """Wanda that keeps the input statistics each linear sublayer was pruned with."""

    def __init__(self):
        self.seen = []

    def statistics(self):
        statistics = super().statistics()
        self.seen.append(statistics)
        return statistics


def test_layer_l_plus_1_is_calibrated_on_the_pruned_outputs_of_layer_l():
    model = make_tiny_model("llama")
    dense = make_tiny_model("llama")
    samples = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    method = RecordingWanda()
    request = PruneRequest(checkpoint=None, output=None, method=method, target=SparsityTarget(pattern=parse_nm("2:4")))
    prune_model(model, request, samples)
    linears_per_layer = len(adapter_for(model).decoder_layer(0).linears)
    q_index = [l.role for l in adapter_for(model).decoder_layer(1).linears].index("q")
    seen = method.seen[linears_per_layer + q_index].value  # layer 1's q_proj

    def q_input_square_norms(network):
        collected = []
        handle = network.model.layers[1].self_attn.q_proj.register_forward_hook(
            lambda module, args, output: collected.append(args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0)))
        with torch.no_grad():
            for sample in samples:
                network(input_ids=sample[None])
        handle.remove()
        return sum(collected)

    # q_proj's input depends on layer 0 (pruned) and layer 1's norm only, not on layer 1's linears.
    assert torch.allclose(seen.double(), q_input_square_norms(model), rtol=1e-5)
    assert not torch.allclose(seen.double(), q_input_square_norms(dense), rtol=1e-3)


def _request(method: str, target: SparsityTarget, **kwargs) -> PruneRequest:
    return PruneRequest(checkpoint=None, output=None, method=get_method(method), target=target, **kwargs)


TARGETS = [SparsityTarget(sparsity=0.5), SparsityTarget(pattern=parse_nm("2:4")), SparsityTarget(pattern=parse_nm("4:8"))]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
def test_every_method_hits_its_pattern_exactly(method, target):
    model = make_tiny_model("llama")
    embedding_before = model.get_input_embeddings().weight.clone()
    samples = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    prune_model(model, _request(method, target), samples)
    adapter = adapter_for(model)
    for linear in adapter.linear_sublayers():
        weight = linear.module.weight
        if target.pattern is not None:
            assert nm_compliance(weight, target.pattern) == 1.0, linear.name
            assert zero_fraction(weight) >= target.pattern.sparsity
        else:
            assert zero_fraction(weight) == pytest.approx(0.5, abs=1e-3), linear.name
    assert torch.equal(model.get_input_embeddings().weight, embedding_before)
    assert zero_fraction(model.get_output_embeddings().weight) < 0.01


def test_calibrated_methods_use_the_calibration_data():
    """Wanda and SparseGPT depend on the calibration samples, magnitude does not."""
    results = {}
    for method in method_names():
        masks = []
        for seed in (0, 1):
            model = make_tiny_model("llama")
            samples = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))
            prune_model(model, _request(method, SparsityTarget(sparsity=0.5)), samples)
            masks.append(model.model.layers[1].mlp.down_proj.weight != 0)
        results[method] = torch.equal(*masks)
    assert results == {"magnitude": True, "wanda": False, "sparsegpt": False}


def test_exclude_leaves_layers_dense():
    model = make_tiny_model("llama")
    samples = torch.randint(0, 256, (2, 16))
    prune_model(model, _request("wanda", SparsityTarget(pattern=parse_nm("2:4")), exclude=("mlp.down_proj",)), samples)
    for layer in adapter_for(model).decoder_layers():
        assert zero_fraction(layer.by_role("down").module.weight) == 0.0
        assert nm_compliance(layer.by_role("q").module.weight, parse_nm("2:4")) == 1.0


def test_owl_gives_non_uniform_layers_with_the_same_mean():
    model = make_tiny_model("llama")
    samples = torch.randint(0, 256, (4, 16))
    record = prune_model(model, _request("wanda", SparsityTarget(sparsity=0.5), owl=True), samples)
    per_layer = record["owl"]["layer_sparsity"]
    assert len(per_layer) == 2 and sum(per_layer) / 2 == pytest.approx(0.5)
    measured = [zero_fraction(torch.cat([l.module.weight.flatten() for l in layer.linears])) for layer in adapter_for(model).decoder_layers()]
    # Wanda prunes floor(in_features * s) per row: up to 1/in_features (1/64 here) below s.
    for got, wanted in zip(measured, per_layer):
        assert wanted - 1 / 64 <= got <= wanted


def test_prune_cli_writes_a_loadable_checkpoint_and_never_touches_the_input(tokenized_tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tokenized_tiny_checkpoint
    before = tree_fingerprint(source)
    output = tmp_path / "pruned"
    result = run_cli("prune", str(source), "-o", str(output), "--method", "sparsegpt", "--pattern", "2:4",
                     "--nsamples", "4", "--seqlen", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert tree_fingerprint(source) == before
    document = json.loads(result.stdout)
    recorded = json.loads((output / "sparsity.json").read_text())
    assert document["path"] == str(output)
    assert recorded["method"] == "sparsegpt" and recorded["pattern"] == "2:4" and recorded["target_sparsity"] == 0.5
    assert recorded["calibration"]["name"] == "canterbury" and recorded["calibration"]["tokens"] == 4 * 32
    assert recorded["calibration"]["seed"] == 0 and recorded["recovery"] is None
    assert recorded["source"]["sha256"] and recorded["tool_version"]
    assert recorded["measured"]["nm_compliance"]["2:4"] == 1.0
    assert len(recorded["layers"]) == 2 * 7
    model = AutoModelForCausalLM.from_pretrained(output)
    for layer in adapter_for(model).linear_sublayers():
        assert nm_compliance(layer.module.weight, parse_nm("2:4")) == 1.0
    inspected = json.loads(run_cli("inspect", str(output), "--json").stdout)
    assert inspected["pattern"] == "2:4" and inspected["total_sparsity"] == pytest.approx(0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no staging left behind


def test_prune_cli_refuses_bad_requests(tokenized_tiny_checkpoint, tmp_path):
    source = str(tokenized_tiny_checkpoint)
    existing = tmp_path / "exists"
    existing.mkdir()
    cases = [
        (["-o", str(existing), "--pattern", "2:4"], "already exists"),
        (["-o", str(tmp_path / "a"), "--pattern", "3:2"], "0 < N < M"),
        (["-o", str(tmp_path / "a")], "exactly one of --sparsity"),
        (["-o", str(tmp_path / "a"), "--sparsity", "0.5", "--pattern", "2:4"], "exactly one of --sparsity"),
        (["-o", str(tmp_path / "a"), "--sparsity", "1.5"], "between 0 and 1"),
        (["-o", str(tmp_path / "a"), "--pattern", "2:4", "--owl"], "--owl"),
        (["-o", str(tmp_path / "a"), "--pattern", "2:4", "--method", "obs"], "unknown pruning method 'obs'"),
        (["-o", str(tmp_path / "a"), "--pattern", "2:4", "--calib", "wikitext2"], "overlaps evaluation text"),
        (["-o", source, "--pattern", "2:4", "--force"], "overlap the input"),
        (["-o", str(tmp_path / "a"), "--pattern", "2:4", "--exclude", "*"], "excludes every linear"),
        (["-o", str(tmp_path / "a"), "--pattern", "2:4", "--nsamples", "128", "--seqlen", "2048"], "fewer than --nsamples x --seqlen"),
    ]
    for arguments, needle in cases:
        result = run_cli("prune", source, *arguments)
        assert result.returncode == 2, (arguments, result.stderr)
        assert needle in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "a").exists()
    assert list(existing.iterdir()) == []


def test_force_replaces_an_existing_output(tokenized_tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    result = run_cli("prune", str(tokenized_tiny_checkpoint), "-o", str(output), "--method", "magnitude", "--pattern", "4:8", "--force")
    assert result.returncode == 0, result.stderr
    assert not (output / "old.txt").exists() and (output / "sparsity.json").is_file()


@pytest.mark.parametrize("arguments, layers, heads", [
    (["--structured", "depth", "--drop", "1"], 1, 4),
    (["--structured", "width", "--heads", "0.5", "--ffn", "0.25"], 2, 2),
])
def test_structured_prune_cli_shrinks_and_loads(tokenized_tiny_checkpoint, tmp_path, arguments, layers, heads):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "shrunk"
    result = run_cli("prune", str(tokenized_tiny_checkpoint), "-o", str(output), *arguments, "--nsamples", "4", "--seqlen", "32", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["pattern"] == "structured" and document["structured"]["kind"] == arguments[1]
    assert document["measured"]["parameters"] < document["structured"]["parameters"]["before"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.num_hidden_layers == layers and model.config.num_attention_heads == heads
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_structured_bad_requests(tokenized_tiny_checkpoint, tmp_path):
    source = str(tokenized_tiny_checkpoint)
    for arguments, needle in [
        (["--structured", "depth"], "--drop N"),
        (["--structured", "depth", "--drop", "2"], "drop"),
        (["--structured", "width"], "--heads F"),
        (["--structured", "sideways", "--drop", "1"], "unknown"),
        (["--structured", "depth", "--drop", "1", "--pattern", "2:4"], "not both"),
    ]:
        result = run_cli("prune", source, "-o", str(tmp_path / "x"), *arguments, "--nsamples", "2", "--seqlen", "16")
        assert result.returncode == 2, (arguments, result.stderr)
        assert needle in result.stderr, (arguments, result.stderr)
    assert not (tmp_path / "x").exists()
