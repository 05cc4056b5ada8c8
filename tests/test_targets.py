import platform

import torch

from conftest import run_cli, run_cli_json
from sparsedeploy.backends import backend_names, get_backend
from sparsedeploy.targets import load_profiles

CONTRACT_TARGETS = {"tensorrt", "cuda", "deepsparse", "onnxruntime", "gguf"}


def test_targets_json_follows_the_contract():
    targets = run_cli_json("targets")
    assert {target["name"] for target in targets} == CONTRACT_TARGETS
    for target in targets:
        assert set(target) >= {"name", "backend", "device", "available", "reason", "precisions", "patterns", "profile"}
        assert isinstance(target["available"], bool) and target["reason"]
        assert target["profile"]["backend"] == target["backend"]
    by_name = {target["name"]: target for target in targets}
    assert by_name["onnxruntime"]["available"], by_name["onnxruntime"]["reason"]
    if platform.machine() == "x86_64":  # `make install` creates DeepSparse's own venv there
        assert by_name["deepsparse"]["available"], by_name["deepsparse"]["reason"]
    for gpu_target in ("cuda", "tensorrt"):
        assert by_name[gpu_target]["device"] == "cuda"
        assert by_name[gpu_target]["patterns"] == ["2:4"]
        if not torch.cuda.is_available():
            assert not by_name[gpu_target]["available"]
            assert "GPU" in by_name[gpu_target]["reason"] or "not installed" in by_name[gpu_target]["reason"]


def test_every_profile_names_a_registered_backend_with_checks_and_gates():
    for profile in load_profiles():
        assert profile.backend in backend_names()
        assert get_backend(profile.backend).device == profile.device
        assert profile.precision in profile.precisions
        assert {"quality", "latency"} <= set(profile.check)
        assert profile.gates, f"{profile.name} has no gates"


def test_a_broken_profile_is_a_clear_error(tmp_path):
    (tmp_path / "edge.toml").write_text('backend = "no-such-engine"\ndevice = "cpu"\nprecision = "fp32"\nprecisions = ["fp32"]\npatterns = ["dense"]\n')
    result = run_cli("targets", env={"SPARSEDEPLOY_TARGETS": str(tmp_path)})
    assert result.returncode == 2
    assert "unknown backend 'no-such-engine'" in result.stderr
    (tmp_path / "edge.toml").write_text("backend = [")
    assert "not valid TOML" in run_cli("targets", env={"SPARSEDEPLOY_TARGETS": str(tmp_path)}).stderr
