import json

import pytest
import torch

from conftest import make_tiny_model, run_cli, save_checkpoint, tree_fingerprint
from sparsedeploy.models.checkpoint import resolve_checkpoint
from sparsedeploy.models.inspection import inspect_checkpoint
from sparsedeploy.prune.patterns import NMPattern, nm_compliance, parse_nm, zero_fraction
from sparsedeploy.errors import BadInput


def test_nm_compliance_by_hand():
    weight = torch.tensor(
        [
            [1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0],  # groups of 4: ok (2 nz), bad (3 nz)
            [0.0, 0.0, 0.0, 3.0, 0.0, 5.0, 0.0, 6.0],  # ok (1 nz), ok (2 nz)
        ]
    )
    assert nm_compliance(weight, NMPattern(2, 4)) == pytest.approx(3 / 4)
    # 4:8 groups: row 0 has 5 non-zeros (bad), row 1 has 3 (ok).
    assert nm_compliance(weight, NMPattern(4, 8)) == pytest.approx(1 / 2)
    assert zero_fraction(weight) == pytest.approx(8 / 16)


def test_nm_compliance_ignores_a_partial_last_group():
    weight = torch.ones(2, 6)
    weight[:, [0, 1]] = 0  # first group of 4 complies; columns 4-5 are no group
    assert nm_compliance(weight, NMPattern(2, 4)) == 1.0


def test_nm_compliance_equals_the_slow_definition():
    """Against groups reshaped and counted one by one; tensors and numpy arrays alike."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols in [(5, 16), (3, 13), (4, 3), (0, 8)]:  # ragged tail, too narrow, empty
        for density in (0.2, 0.5, 0.8):
            weight = torch.randn(rows, cols, generator=generator)
            weight[torch.rand(rows, cols, generator=generator) > density] = 0
            for text in ("2:4", "4:8", "1:4"):
                pattern = parse_nm(text)
                groups = [weight[r, g * pattern.m:(g + 1) * pattern.m] for r in range(rows) for g in range(cols // pattern.m)]
                slow = sum(int((group != 0).sum()) <= pattern.n for group in groups) / len(groups) if groups else 0.0
                assert nm_compliance(weight, pattern) == pytest.approx(slow, abs=1e-12)
                assert nm_compliance(weight.numpy(), pattern) == pytest.approx(slow, abs=1e-12)


@pytest.mark.parametrize("text", ["2:4", "4:8", " 1 : 4 "])
def test_parse_nm(text):
    pattern = parse_nm(text)
    assert f"{pattern.n}:{pattern.m}" == text.replace(" ", "")


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "abc"])
def test_parse_nm_rejects(text):
    with pytest.raises(BadInput):
        parse_nm(text)


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest of every 4 along the input dimension."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, drop, 0.0).reshape_as(weight)


def test_inspect_measures_sparsity_and_patterns(tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(_two_four(module.weight))
    report = inspect_checkpoint(resolve_checkpoint(str(save_checkpoint(model, tmp_path / "m"))))
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert len(report["layers"]) == 2 * 7
    for layer in report["layers"]:
        assert layer["sparsity"] == pytest.approx(0.5)
        assert layer["nm_compliance"] == {"2:4": 1.0, "4:8": 1.0}
    assert report["total_sparsity"] == pytest.approx(0.5)
    assert report["pattern"] == "2:4"


def test_dense_model_is_reported_dense(tiny_checkpoint):
    report = inspect_checkpoint(resolve_checkpoint(str(tiny_checkpoint)))
    assert report["pattern"] == "dense" and report["total_sparsity"] < 0.01
    assert report["nonfinite"]["tensors"] == 0


def test_inspect_cli_json_follows_the_contract_and_writes_nothing(tiny_checkpoint):
    before = tree_fingerprint(tiny_checkpoint)
    result = run_cli("inspect", str(tiny_checkpoint), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("path", "architecture", "parameters", "total_sparsity", "pattern", "layers"):
        assert key in report
    for key in ("name", "shape", "sparsity", "nm_compliance"):
        assert key in report["layers"][0]
    assert set(report["layers"][0]["nm_compliance"]) == {"2:4", "4:8"}
    assert tree_fingerprint(tiny_checkpoint) == before


def test_inspect_reports_nan_weights_and_exits_2(tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
    path = save_checkpoint(model, tmp_path / "nan")
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["nonfinite"] == {"tensors": 1, "values": 3, "first": "model.layers.1.mlp.down_proj.weight"}
    assert "NaN/Inf" in result.stderr and "corrupt" in result.stderr
