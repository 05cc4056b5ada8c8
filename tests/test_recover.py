"""Recovery after pruning: the distillation loss and the masks on small tensors, then
`recover` (and `prune --recover-steps`) on tiny models through the real command line:
the pattern survives bit for bit, the held-out loss goes down, an interrupted run
resumes, a diverged one keeps its last good state; and one run on the default model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli, save_checkpoint, save_tokenized_tiny, tree_fingerprint
from sparsedeploy.recover.distill import (
    distillation_kl,
    hold_pruned_weights,
    next_token_loss,
    pruned_positions,
    reapply_masks,
    revived_weights,
)

# -- the loss -----------------------------------------------------------------------------


def test_kl_is_zero_when_the_student_is_the_teacher():
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0))
    assert distillation_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_torch_and_does_not_depend_on_the_chunking():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, 40, generator=generator), torch.randn(3, 7, 40, generator=generator)
    expected = F.kl_div(F.log_softmax(student, -1).reshape(-1, 40), F.log_softmax(teacher, -1).reshape(-1, 40),
                        log_target=True, reduction="batchmean")
    for chunk in (1, 4, 21, 1000):
        assert distillation_kl(student, teacher, chunk_tokens=chunk).item() == pytest.approx(expected.item(), rel=1e-5)
    # Temperature: KL of the softened distributions, times T^2.
    softened = F.kl_div(F.log_softmax(student / 2, -1).reshape(-1, 40), F.log_softmax(teacher / 2, -1).reshape(-1, 40),
                        log_target=True, reduction="batchmean") * 4
    assert distillation_kl(student, teacher, temperature=2.0).item() == pytest.approx(softened.item(), rel=1e-5)


def test_kl_gradient_pulls_the_student_towards_the_teacher():
    teacher = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(2))
    student = torch.zeros(1, 4, 30, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=50.0)
    losses = []
    for _ in range(30):
        loss = distillation_kl(student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_next_token_loss_is_the_shifted_cross_entropy():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(4))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert next_token_loss(logits, ids).item() == pytest.approx(expected.item(), rel=1e-6)


# -- the masks ----------------------------------------------------------------------------


def _two_of_four(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return weight * keep.reshape(weight.shape)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd-momentum"])
def test_pruned_weights_stay_exactly_zero_through_training(pattern, optimizer_name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        if pattern == "2:4":
            layer.weight.copy_(_two_of_four(layer.weight))
        else:
            layer.weight.mul_(torch.rand(layer.weight.shape) > 0.6)
    named = {"layer": layer.weight}
    masks = pruned_positions(named.items())
    zeros_before = masks["layer"].clone()
    hold_pruned_weights(named, masks)
    optimizer = (torch.optim.AdamW([layer.weight], lr=0.05, weight_decay=0.1) if optimizer_name == "adamw"
                 else torch.optim.SGD([layer.weight], lr=0.05, momentum=0.9, weight_decay=0.1))
    target = torch.randn(32, 8)
    inputs = torch.randn(32, 16)
    for _ in range(25):
        loss = F.mse_loss(layer(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        assert torch.all(layer.weight.grad[zeros_before] == 0)
        optimizer.step()
        reapply_masks(named, masks)
    assert torch.equal(layer.weight.detach() == 0, zeros_before), "the zero pattern changed"
    assert revived_weights(named, masks) == {}
    assert not torch.equal(layer.weight.detach(), torch.zeros_like(layer.weight))  # the rest did train


def test_revived_weights_are_counted():
    weight = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    masks = pruned_positions({"w": weight}.items())
    with torch.no_grad():
        weight[0, 0] = 0.5
    assert revived_weights({"w": weight}, masks) == {"w": 1}
    assert pruned_positions({"dense": torch.nn.Parameter(torch.ones(2, 2))}.items()) == {}


# -- the command on tiny models -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory, default_checkpoint):
    """A tiny Llama with the default tokenizer, pruned 2:4 and 50% by magnitude."""
    root = tmp_path_factory.mktemp("recover")
    dense = save_tokenized_tiny(root / "dense", default_checkpoint)
    pruned = {}
    for label, args in (("2:4", ["--pattern", "2:4"]), ("50%", ["--sparsity", "0.5"])):
        pruned[label] = root / f"pruned-{label.replace(':', 'of').replace('%', '')}"
        result = run_cli("prune", str(dense), "-o", str(pruned[label]), "--method", "magnitude", *args)
        assert result.returncode == 0, result.stderr
    return {"root": root, "dense": dense, **pruned}


# Small, fast runs: 64-token windows, a held-out set of 4 windows.
FAST = ["--seqlen", "64", "--heldout-windows", "4", "--lr", "1e-3"]


def zero_positions(checkpoint) -> dict[str, torch.Tensor]:
    return {name: tensor == 0 for name, tensor in load_file(checkpoint / "model.safetensors").items()
            if ".layers." in name and tensor.dim() == 2}


@pytest.mark.parametrize("label", ["2:4", "50%"])
def test_recover_keeps_the_pattern_bit_for_bit_and_lowers_the_heldout_loss(tiny_pruned, label, tmp_path):
    pruned = tiny_pruned[label]
    before = tree_fingerprint(pruned)
    output = tmp_path / "recovered"
    result = run_cli("recover", str(pruned), "-o", str(output), "--steps", "8", "--eval-every", "4", *FAST, "--json")
    assert result.returncode == 0, result.stderr
    assert tree_fingerprint(pruned) == before, "recover modified its input checkpoint"
    document = json.loads(result.stdout)

    # Every pruned weight is still exactly zero, and only those are.
    old, new = zero_positions(pruned), zero_positions(output)
    assert old.keys() == new.keys() and len(old) == 14
    for name in old:
        assert torch.equal(old[name], new[name]), name
    weights_before, weights_after = load_file(pruned / "model.safetensors"), load_file(output / "model.safetensors")
    assert any(not torch.equal(weights_before[n], weights_after[n]) for n in old), "nothing trained"

    inspected = json.loads(run_cli("inspect", str(output), "--json").stdout)
    original = json.loads(run_cli("inspect", str(pruned), "--json").stdout)
    assert [(l["name"], l["sparsity"], l["nm_compliance"]) for l in inspected["layers"]] == \
        [(l["name"], l["sparsity"], l["nm_compliance"]) for l in original["layers"]]
    if label == "2:4":
        assert inspected["pattern"] == "2:4" and all(l["nm_compliance"]["2:4"] == 1.0 for l in inspected["layers"])

    recovery = document["recovery"]
    assert recovery["teacher"] == {"path": str(tiny_pruned["dense"]), "sha256": json.loads(
        (pruned / "sparsity.json").read_text())["source"]["sha256"]}
    assert recovery["data"]["name"] == "canterbury-books" and recovery["data"]["heldout_windows"] == 4
    assert recovery["steps"] == 8 and recovery["tokens_seen"] == 8 * 4 * 64
    assert recovery["heldout_loss_after"] < recovery["heldout_loss_before"]
    assert recovery["pruned_weights_held"] == sum(int(z.sum()) for z in old.values())
    saved = json.loads((output / "sparsity.json").read_text())
    assert saved["recovery"] == recovery and saved["method"] == "magnitude"
    assert (output / "recovery_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*")), "state or staging directories left behind"


def test_prune_with_recover_steps_goes_from_dense_to_recovered(tiny_pruned, tmp_path):
    output = tmp_path / "one-command"
    result = run_cli("prune", str(tiny_pruned["dense"]), "-o", str(output), "--method", "magnitude", "--pattern", "2:4",
                     "--recover-steps", "2", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["recovery"]["steps"] == 2 and document["measured"]["nm_compliance"]["2:4"] == 1.0
    assert document["source"]["path"] == str(tiny_pruned["dense"])  # the dense model, not the intermediate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-command"]


def test_interrupted_recovery_resumes_from_its_last_saved_step(tiny_pruned, tmp_path, monkeypatch):
    from sparsedeploy.errors import Interrupted
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.recover import run as recovery

    output = tmp_path / "recovered"
    request = recovery.RecoverRequest(checkpoint=resolve_checkpoint(str(tiny_pruned["2:4"])), output=output,
                                      settings=recovery.RecoverSettings(steps=6, seqlen=64, heldout_windows=4,
                                                                        eval_every=2, lr=1e-3))
    real_reapply, calls = recovery.reapply_masks, []

    def interrupt_at_step_5(named, masks):  # what Ctrl-C does: the SIGINT handler raises Interrupted
        calls.append(1)
        if len(calls) == 5:
            raise Interrupted("interrupted")
        real_reapply(named, masks)

    monkeypatch.setattr(recovery, "reapply_masks", interrupt_at_step_5)
    with pytest.raises(Interrupted, match="resume from step 4"):
        recovery.recover_checkpoint(request)
    assert not output.exists()
    state = recovery.state_directory(output)
    assert (state / "checkpoint-4").is_dir()

    monkeypatch.setattr(recovery, "reapply_masks", real_reapply)
    document = recovery.recover_checkpoint(request)
    assert document["recovery"]["steps"] == 6
    # The one-shot held-out loss was measured before the interruption and kept.
    assert document["recovery"]["heldout_loss_before"] == json.loads((output / "sparsity.json").read_text())[
        "recovery"]["heldout_loss_before"]
    assert output.is_dir() and not state.exists()
    old, new = zero_positions(tiny_pruned["2:4"]), zero_positions(output)
    assert all(torch.equal(old[name], new[name]) for name in old)


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_state(tiny_pruned, tmp_path, monkeypatch):
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.recover import run as recovery

    output = tmp_path / "recovered"
    request = recovery.RecoverRequest(checkpoint=resolve_checkpoint(str(tiny_pruned["2:4"])), output=output,
                                      settings=recovery.RecoverSettings(steps=6, seqlen=64, heldout_windows=4, eval_every=2))
    real_kl, calls = recovery.distillation_kl, []

    def nan_at_the_fourth_training_step(*args, **kwargs):
        loss = real_kl(*args, **kwargs)
        calls.append(torch.is_grad_enabled())
        return loss * float("nan") if sum(calls) == 4 else loss

    monkeypatch.setattr(recovery, "distillation_kl", nan_at_the_fourth_training_step)
    with pytest.raises(recovery.TrainingDiverged) as raised:
        recovery.recover_checkpoint(request)
    assert raised.value.exit_code == 1
    assert "at step 4" in str(raised.value) and "last good state (step 2)" in str(raised.value)
    assert not output.exists() and (recovery.state_directory(output) / "checkpoint-2").is_dir()


@pytest.mark.parametrize("case", ["no-record", "other-vocabulary", "steps-0", "evaluation-text"])
def test_bad_input_is_refused_with_one_line(tiny_pruned, tmp_path, case):
    from transformers import AutoModelForCausalLM, LlamaConfig

    pruned, args = tiny_pruned["2:4"], []
    if case == "no-record":
        pruned = shutil.copytree(pruned, tmp_path / "bare")
        (pruned / "sparsity.json").unlink()
        expected = "--teacher"
    elif case == "other-vocabulary":
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        other = save_checkpoint(AutoModelForCausalLM.from_config(config), tmp_path / "other")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_pruned["dense"] / name, other / name)
        args, expected = ["--teacher", str(other)], "vocabulary"
    elif case == "steps-0":
        args, expected = ["--steps", "0"], "--steps 0"
    else:
        args, expected = ["--data", "wikitext2"], "overlaps evaluation text"
    result = run_cli("recover", str(pruned), "-o", str(tmp_path / "out"), *args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


# -- the default model ------------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_recovers_a_few_steps_with_2of4_intact(default_checkpoint, tmp_path):
    """Magnitude 2:4 on the real model (no calibration: fast), then a few recovery steps:
    compliance stays 1.0 and the held-out loss goes down."""
    pruned = tmp_path / "magnitude-2of4"
    result = run_cli("prune", "default", "-o", str(pruned), "--method", "magnitude", "--pattern", "2:4")
    assert result.returncode == 0, result.stderr
    output = tmp_path / "recovered"
    result = run_cli("recover", str(pruned), "-o", str(output), "--steps", "4", "--eval-every", "2", "--seqlen", "128",
                     "--batch", "2", "--heldout-windows", "4", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["recovery"]["teacher"]["path"] == "default"
    assert document["measured"]["nm_compliance"]["2:4"] == 1.0
    assert document["recovery"]["heldout_loss_after"] < document["recovery"]["heldout_loss_before"]
    old, new = zero_positions(pruned), zero_positions(output)
    assert len(old) == 30 * 7 and all(torch.equal(old[name], new[name]) for name in old)


def test_prune_with_recover_steps_keeps_the_one_shot_checkpoint_when_recovery_is_interrupted(tiny_pruned, tmp_path,
                                                                                          monkeypatch):
    from sparsedeploy.cli import _prune_then_recover
    from sparsedeploy.errors import Interrupted
    from sparsedeploy.models.checkpoint import resolve_checkpoint
    from sparsedeploy.prune.methods import SparsityTarget, get_method
    from sparsedeploy.prune.patterns import parse_nm
    from sparsedeploy.recover import run as recovery

    def interrupt(named, masks):
        raise Interrupted("interrupted; nothing half-written was left behind")

    monkeypatch.setattr(recovery, "reapply_masks", interrupt)
    output = tmp_path / "recovered"
    with pytest.raises(Interrupted) as raised:
        _prune_then_recover(resolve_checkpoint(str(tiny_pruned["dense"])), output, 2, "cpu", True,
                            method=get_method("magnitude"), target=SparsityTarget(pattern=parse_nm("2:4")))
    one_shot = tmp_path / ".recovered.one-shot"
    assert f"sparsedeploy recover {one_shot} -o {output} --steps 2" in str(raised.value)
    assert not output.exists() and (one_shot / "sparsity.json").is_file()
    assert json.loads((one_shot / "sparsity.json").read_text())["source"]["path"] == str(tiny_pruned["dense"])
