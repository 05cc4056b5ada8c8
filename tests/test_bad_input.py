"""Every bad input of the foundation: one clear line naming the problem and the fix,
exit 2, and nothing written into an input directory."""

import json
import shutil

import pytest
import torch

from conftest import REPOSITORY, make_tiny_model, run_cli, save_checkpoint, tree_fingerprint


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


def test_missing_path():
    _assert_one_line_error(run_cli("eval", "/nonexistent/model"), "does not exist", "pass `default`")


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    _assert_one_line_error(run_cli("inspect", str(path)), "is a file, not a directory")


def test_directory_without_config(tmp_path):
    _assert_one_line_error(run_cli("eval", str(tmp_path)), "has no config.json")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    _assert_one_line_error(run_cli("inspect", str(tmp_path)), "pickle", "safetensors")


def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _assert_one_line_error(run_cli("inspect", str(broken)), "truncated", "model.safetensors")


def test_unsupported_architecture(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(run_cli("eval", str(tiny_checkpoint)), "'gpt2' is not supported", "llama")


def test_nan_weights_refused_by_eval(tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    path = save_checkpoint(model, tmp_path / "nan")
    shutil.copy(_default_tokenizer(), path / "tokenizer.json")
    before = tree_fingerprint(path)
    _assert_one_line_error(run_cli("eval", str(path), "--windows", "1", "--seqlen", "8"), "NaN/Inf", "q_proj")
    assert tree_fingerprint(path) == before


def test_eval_text_shorter_than_one_window(tmp_path, tiny_checkpoint):
    shutil.copy(_default_tokenizer(), tiny_checkpoint / "tokenizer.json")
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    _assert_one_line_error(
        run_cli("eval", str(tiny_checkpoint), "--data", f"file:{text}", "--seqlen", "64"),
        "shorter than one window",
        "smaller --seqlen",
    )


def test_unknown_data_source(tiny_checkpoint):
    _assert_one_line_error(run_cli("eval", str(tiny_checkpoint), "--data", "wikitext3"), "unknown data source 'wikitext3'")


def test_checkpoint_without_tokenizer(tiny_checkpoint):
    _assert_one_line_error(run_cli("eval", str(tiny_checkpoint), "--windows", "1"), "no tokenizer files")


def test_usage_error_exits_2():
    assert run_cli("eval").returncode == 2
    assert run_cli("eval", "default", "--no-such-flag").returncode == 2


def _default_tokenizer():
    from sparsedeploy.models.checkpoint import resolve_checkpoint

    return resolve_checkpoint("default").path / "tokenizer.json"


def test_a_bad_profile_value_is_named_with_its_table(tmp_path, tiny_checkpoint):
    """Square brackets in a message ("[build]") are text, not terminal markup."""
    targets = tmp_path / "targets"
    targets.mkdir()
    profile = (REPOSITORY / "targets" / "onnxruntime.toml").read_text()
    (targets / "onnxruntime.toml").write_text(profile.replace("smoothquant_alpha = 0.5", "smoothquant_alpha = 2"))
    result = run_cli("build", "--target", "onnxruntime", "--model", str(tiny_checkpoint), "--quant", "int8",
                     "-o", str(tmp_path / "out"), env={"SPARSEDEPLOY_TARGETS": str(targets)})
    _assert_one_line_error(result, "smoothquant_alpha in [build] must be a number in [0, 1] or false, not 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, bad, message", [
    ("int4_gptq = true", 'int4_gptq = "yes"', "int4_gptq in [build] must be true or false, not 'yes'"),
    ("int4_gptq_nsamples = 64", "int4_gptq_nsamples = 0",
     "int4_gptq_nsamples in the profile's [build] table must be a whole number >= 1, not 0"),
    ("calib_seqlen = 256", 'calib_seqlen = "long"',
     "calib_seqlen in the profile's [build] table must be a whole number >= 2, not 'long'"),
    ("int4_block_size = 32", 'int4_block_size = "32"',
     "int4_block_size in the profile's [build] table must be a whole number >= 2, not '32'"),
])
def test_bad_int4_build_settings_are_one_line_errors(tmp_path, tiny_checkpoint, setting, bad, message):
    targets = tmp_path / "targets"
    targets.mkdir()
    profile = (REPOSITORY / "targets" / "onnxruntime.toml").read_text()
    assert setting in profile
    (targets / "onnxruntime.toml").write_text(profile.replace(setting, bad))
    result = run_cli("build", "--target", "onnxruntime", "--model", str(tiny_checkpoint), "--quant", "int4",
                     "-o", str(tmp_path / "out"), env={"SPARSEDEPLOY_TARGETS": str(targets)})
    _assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()
