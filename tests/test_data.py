import hashlib
import os
import subprocess
import sys

import pytest
import torch

from sparsedeploy.data.sources import (
    BUILTIN_SOURCES,
    TEXTS_DIR,
    TextSource,
    check_disjoint,
    load_text,
    text_overlap,
)
from sparsedeploy.data.windows import calibration_windows, evaluation_windows
from sparsedeploy.errors import BadInput

WIKITEXT2_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def test_wikitext2_is_shipped_byte_for_byte():
    source = load_text("wikitext2")
    assert source.sha256 == WIKITEXT2_SHA256
    assert source.text.startswith(" = Robert Boulter = ")
    assert "\r\n" in source.text  # CRLF kept: tokenization must not depend on the platform
    assert len(source.text.encode("utf-8")) == 1_290_547


def test_canterbury_is_lcet10_and_books_are_all_four():
    lcet10 = load_text("canterbury")
    assert "WORKSHOP ON ELECTRONIC TEXTS" in lcet10.text
    books = load_text("canterbury-books")
    assert lcet10.text in books.text and "Paradise Lost" in books.text and "Alice" in books.text
    # The shipped licence notice exists beside the texts.
    assert "CC BY-SA" in (TEXTS_DIR / "README.md").read_text()


def test_file_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"line one\r\nline two\n")
    source = load_text(f"file:{path}")
    assert source.text == "line one\r\nline two\n"
    assert source.sha256 == hashlib.sha256(b"line one\r\nline two\n").hexdigest()


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nope", "unknown data source 'nope'"),
        ("file:/does/not/exist.txt", "does not exist"),
        ("hf:", "malformed"),
        ("hf:a:b:c:d", "malformed"),
    ],
)
def test_bad_sources_are_one_line_errors(spec, needle):
    with pytest.raises(BadInput) as error:
        load_text(spec)
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def _load_hf_offline(spec: str, tmp_path) -> subprocess.CompletedProcess:
    # A fresh interpreter: `datasets` reads HF_HUB_OFFLINE and its cache path at import.
    # Offline as CI is (no hub), with the dataset cache in tmp_path, not the user's home.
    script = (
        "import sys\n"
        "from sparsedeploy.data.sources import load_text\n"
        "from sparsedeploy.errors import BadInput\n"
        "try:\n"
        f"    source = load_text({spec!r})\n"
        "except BadInput as error:\n"
        "    print('BadInput:', error); sys.exit(2)\n"
        "print(repr(source.text))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_hf_source_reads_a_local_dataset_offline(tmp_path):
    dataset_dir = tmp_path / "my-dataset"
    dataset_dir.mkdir()
    (dataset_dir / "train.txt").write_text("First line of text.\n\nSecond paragraph here.\n")
    result = _load_hf_offline(f"hf:{dataset_dir}", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The `text` builder makes one row per line; empty rows are dropped, rows joined by a blank line.
    assert result.stdout.strip() == repr("First line of text.\n\nSecond paragraph here.")


def test_hf_source_unreachable_is_one_clear_line(tmp_path):
    result = _load_hf_offline("hf:no-such-dataset-anywhere", tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stdout.strip()
    assert message.count("\n") == 0
    assert "could not load dataset 'hf:no-such-dataset-anywhere'" in message
    assert "use file:PATH or a built-in source" in message


def test_empty_and_binary_files_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(BadInput, match="empty"):
        load_text(f"file:{tmp_path / 'empty.txt'}")
    with pytest.raises(BadInput, match="not UTF-8"):
        load_text(f"file:{tmp_path / 'binary.bin'}")


def test_calibration_on_evaluation_text_is_refused(tmp_path):
    wikitext = load_text("wikitext2")
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(wikitext.text[200_000:230_000])  # a slice of the test split
    with pytest.raises(BadInput, match="overlaps evaluation text"):
        check_disjoint(load_text(f"file:{excerpt}"), wikitext)
    with pytest.raises(BadInput, match="overlaps"):
        check_disjoint(wikitext, wikitext)
    # A corpus that contains the whole evaluation text is refused too.
    superset = TextSource("superset", load_text("canterbury-books").text + wikitext.text)
    with pytest.raises(BadInput, match="overlaps"):
        check_disjoint(superset, wikitext)


def test_disjoint_texts_pass():
    canterbury, wikitext = load_text("canterbury"), load_text("wikitext2")
    assert text_overlap(canterbury, wikitext) < 0.001
    check_disjoint(canterbury, wikitext)


def test_evaluation_windows_are_the_first_n_non_overlapping():
    ids = torch.arange(100)
    windows = evaluation_windows(ids, seqlen=10, windows=3)
    assert windows.shape == (3, 10)
    assert torch.equal(windows.flatten(), torch.arange(30))


def test_evaluation_windows_errors():
    ids = torch.arange(25)
    with pytest.raises(BadInput, match="shorter than one window"):
        evaluation_windows(ids, seqlen=30, windows=1, source_name="tiny")
    with pytest.raises(BadInput, match="only 2 windows"):
        evaluation_windows(ids, seqlen=10, windows=3)
    with pytest.raises(BadInput):
        evaluation_windows(ids, seqlen=1, windows=1)


def test_calibration_windows_are_deterministic_per_seed():
    ids = torch.arange(10_000)
    first = calibration_windows(ids, seqlen=16, nsamples=8, seed=0)
    assert torch.equal(first, calibration_windows(ids, seqlen=16, nsamples=8, seed=0))
    assert not torch.equal(first, calibration_windows(ids, seqlen=16, nsamples=8, seed=1))
    assert first.shape == (8, 16)
    # Each sample is a contiguous slice of the text.
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(8, 15, dtype=torch.long))
    with pytest.raises(BadInput, match="fewer than --nsamples x --seqlen"):
        calibration_windows(torch.arange(16), seqlen=16, nsamples=1, seed=0)
    with pytest.raises(BadInput, match="4 x 16 = 64"):
        calibration_windows(torch.arange(63), seqlen=16, nsamples=4, seed=0)


def test_every_builtin_source_loads():
    for name in BUILTIN_SOURCES:
        assert len(load_text(name).text) > 100_000
