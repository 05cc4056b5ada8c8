"""Outputs appear whole or not at all, also on Ctrl-C."""

import signal
import subprocess
import sys
import time

import pytest

from sparsedeploy.atomic import check_output_dir, staged_directory
from sparsedeploy.errors import BadInput


def test_failure_leaves_nothing(tmp_path):
    output = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with staged_directory(output) as staging:
            (staging / "half-written.safetensors").write_bytes(b"x" * 10)
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []


def test_success_renames_into_place_and_creates_parents(tmp_path):
    output = tmp_path / "nested" / "result"
    with staged_directory(output) as staging:
        (staging / "file").write_text("done")
        assert not output.exists()  # invisible until complete
    assert (output / "file").read_text() == "done"
    assert [p.name for p in output.parent.iterdir()] == ["result"]


def test_existing_output_survives_a_failed_replacement(tmp_path):
    output = tmp_path / "result"
    output.mkdir()
    (output / "file").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(output) as staging:
            (staging / "file").write_text("new")
            raise RuntimeError
    assert (output / "file").read_text() == "old"


def test_output_checks(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    with pytest.raises(BadInput, match="overlap the input"):
        check_output_dir(source / "pruned", force=True, inputs=(source,))
    with pytest.raises(BadInput, match="already exists"):
        check_output_dir(source, force=False)
    assert check_output_dir(tmp_path / "new", force=False) == (tmp_path / "new").resolve()


def test_ctrl_c_during_prune_exits_130_and_leaves_no_output(tmp_path, tokenized_tiny_checkpoint):
    output = tmp_path / "pruned"
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsedeploy", "prune", str(tokenized_tiny_checkpoint), "-o", str(output),
         "--method", "sparsegpt", "--pattern", "2:4", "--calib", "canterbury-books", "--nsamples", "20000", "--seqlen", "8"],
        stderr=subprocess.PIPE, text=True,
    )
    # Wait until it is really calibrating, then interrupt.
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "Pruning" not in line:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
    assert "Pruning" in line, f"prune did not start: rc={process.poll()} {line}"
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest
    assert "interrupted" in rest
    assert not output.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []
