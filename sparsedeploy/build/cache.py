"""Content-addressed cache of built artifacts and of measurements.

An artifact's key is the sha256 of everything that determines it: the checkpoint's
content hash, the backend and its build settings (precision, quantizer, shapes), and
the versions of the tool, the engine and the exporter stack. A second identical build
finds every artifact (the dense baseline included) and every measurement here, so it
costs a few seconds; `--fresh` re-measures. Entries are published atomically and their
files made read-only, because bundles hard-link them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from sparsedeploy import __version__
from sparsedeploy.atomic import staged_directory
from sparsedeploy.backends.base import ARTIFACT_RECORD, BuiltArtifact
from sparsedeploy.models.default import cache_root

COMPLETE_MARK = ARTIFACT_RECORD  # written last: a directory without it is not an entry


def stack_versions() -> dict:
    """Versions that change what an export or a measurement produces."""
    import onnx
    import torch
    import transformers

    return {"sparsedeploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}


def content_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def build_cache_root() -> Path:
    """SPARSEDEPLOY_BUILD_CACHE, else the tool's cache (beside the default model)."""
    explicit = os.environ.get("SPARSEDEPLOY_BUILD_CACHE")
    return Path(explicit).expanduser() if explicit else cache_root()


def artifacts_dir() -> Path:
    return build_cache_root() / "artifacts"


def measurements_dir() -> Path:
    return build_cache_root() / "measurements"


def cached_artifact(key: str, build: Callable[[Path], BuiltArtifact]) -> tuple[BuiltArtifact, bool]:
    """The artifact for ``key``, built by ``build(empty_dir)`` when absent. Returns
    (artifact, True if it came from the cache)."""
    directory = artifacts_dir() / key
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if (directory / COMPLETE_MARK).is_file():
            artifact = BuiltArtifact.from_directory(directory)
            if artifact.details.get("files") == directory_digests(directory):
                return artifact, True
        if directory.exists():  # debris of an interrupted tool, or files changed through a bundle's hard link
            _make_writable(directory)
            shutil.rmtree(directory)
        with staged_directory(directory) as staging:
            artifact = build(staging)
            artifact.directory = staging
            artifact.details["files"] = directory_digests(staging)
            artifact.save_record()
            _make_read_only(staging)
        artifact.directory = directory
        return artifact, False


def directory_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file but the record, by relative path."""
    from sparsedeploy.models.checkpoint import sha256_file

    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ARTIFACT_RECORD
    }


def _make_writable(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _make_read_only(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def load_measurement(key: str) -> dict | None:
    path = measurements_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def store_measurement(key: str, value: dict) -> None:
    directory = measurements_dir()
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{key}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps({**value, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    temporary.replace(directory / f"{key}.json")
