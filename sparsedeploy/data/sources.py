"""Named text sources: `wikitext2`, `canterbury`, `canterbury-books`, `file:PATH`, and
`hf:NAME[:CONFIG[:SPLIT]]`.

Texts are read byte for byte (no newline translation), so the same source always
tokenizes to the same ids and its sha256 identifies it in reports.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sparsedeploy.errors import BadInput

TEXTS_DIR = Path(__file__).parent / "texts"

# Built-in sources: name -> files joined (in order) with a blank line.
BUILTIN_SOURCES: dict[str, tuple[str, ...]] = {
    "wikitext2": ("wikitext2/wiki.test.raw",),
    "canterbury": ("canterbury/lcet10.txt",),
    "canterbury-books": (
        "canterbury/lcet10.txt",
        "canterbury/alice29.txt",
        "canterbury/asyoulik.txt",
        "canterbury/plrabn12.txt",
    ),
}
EVALUATION_SOURCES = ("wikitext2",)

SOURCE_HELP = "use wikitext2, canterbury, canterbury-books, file:PATH or hf:NAME[:CONFIG[:SPLIT]]"


@dataclass(frozen=True)
class TextSource:
    name: str
    text: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def load_text(spec: str) -> TextSource:
    """Resolve a source name from the command line to its text."""
    if spec in BUILTIN_SOURCES:
        parts = [_read_exact(TEXTS_DIR / rel) for rel in BUILTIN_SOURCES[spec]]
        return TextSource(spec, "\n\n".join(parts))
    if spec.startswith("file:"):
        return TextSource(spec, _read_user_file(Path(spec[len("file:") :]).expanduser()))
    if spec.startswith("hf:"):
        return TextSource(spec, _read_hf_dataset(spec))
    raise BadInput(f"unknown data source '{spec}'; {SOURCE_HELP}")


def _read_exact(path: Path) -> str:
    # newline="" keeps CRLF as stored: tokenization must not depend on the platform.
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def _read_user_file(path: Path) -> str:
    if not path.is_file():
        raise BadInput(f"text file '{path}' does not exist; pass file:PATH with an existing UTF-8 text file")
    try:
        text = _read_exact(path)
    except UnicodeDecodeError as error:
        raise BadInput(f"text file '{path}' is not UTF-8 ({error.reason}); convert it to UTF-8 text") from None
    if not text.strip():
        raise BadInput(f"text file '{path}' is empty; pass a file with text in it")
    return text


def _read_hf_dataset(spec: str) -> str:
    fields = spec[len("hf:") :].split(":")
    if not fields[0] or len(fields) > 3:
        raise BadInput(f"data source '{spec}' is malformed; write hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name, config, split = (fields + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise BadInput("hf: sources need the `datasets` package; pip install 'sparsedeploy[hf]'") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as error:  # offline, unknown name, gated...: one clear line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(
            f"could not load dataset '{spec}' from the hub ({first_line}); offline, use file:PATH or a built-in source"
        ) from None
    if "text" not in dataset.column_names:
        raise BadInput(f"dataset '{spec}' has no 'text' column (columns: {dataset.column_names}); pick a text dataset")
    return "\n\n".join(row for row in dataset["text"] if row)


# -- overlap between calibration/training text and evaluation text ------------------

SHINGLE_WORDS = 13  # long enough that shared boilerplate phrases do not count
OVERLAP_LIMIT = 0.01


def _shingles(text: str) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i : i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


def text_overlap(first: TextSource, second: TextSource) -> float:
    """Largest share of either text's 13-word sequences that also occur in the other."""
    a, b = _shingles(first.text), _shingles(second.text)
    if not a or not b:
        return 0.0
    shared = len(a & b)
    return max(shared / len(a), shared / len(b))


def check_disjoint(training: TextSource, evaluation: TextSource, role: str = "calibration") -> None:
    """Refuse a calibration or training text that overlaps the evaluation text: the
    measured quality would be inflated and mean nothing."""
    if training.sha256 == evaluation.sha256:
        overlap = 1.0
    else:
        overlap = text_overlap(training, evaluation)
    if overlap >= OVERLAP_LIMIT:
        raise BadInput(
            f"{role} text '{training.name}' overlaps evaluation text '{evaluation.name}' "
            f"({overlap:.0%} of its 13-word sequences); use a different {role} source, e.g. canterbury"
        )
