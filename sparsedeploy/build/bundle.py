"""The build bundle: one directory, written atomically, with a manifest of every file.

    BUNDLE/
      artifact/     what ships to the target (engine artifact + artifact.json)
      baseline/     the dense source model built by the same backend and precision
      reference/    the checkpoint itself (safetensors, tokenizer, sparsity.json): the
                    PyTorch reference of the quality check
      report.json   report.md   latency.png
      manifest.json {schema, files: [{path, sha256, bytes}]}: every other file

`check BUNDLE` needs nothing outside the bundle. Large files are hard-linked from the
cache when it is on the same file system (cache files are read-only), else copied.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from sparsedeploy.atomic import write_file_atomically
from sparsedeploy.errors import BadInput, SparsedeployError
from sparsedeploy.models.checkpoint import sha256_file

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "sparsedeploy.manifest/1"
ARTIFACT_DIR, BASELINE_DIR, REFERENCE_DIR = "artifact", "baseline", "reference"
REPORT_JSON, REPORT_MD = "report.json", "report.md"


class DiskFull(SparsedeployError):
    """No space left while writing the bundle (exit 2: free space or choose another -o)."""


def place_tree(source: Path, destination: Path, link: bool = True) -> None:
    """Hard-link (``link``, falling back to a copy) or copy every file of ``source`` into ``destination``."""
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        copy_file(path, target)


def copy_file(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on the device while writing '{target}'; free space or choose another -o") from None
        raise


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on the device while writing '{path}'; free space or choose another -o") from None
        raise


def write_manifest(bundle: Path) -> dict:
    files = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append({"path": path.relative_to(bundle).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size})
    manifest = {"schema": MANIFEST_SCHEMA, "files": files}
    # Rewritten in place when provisioning adds a device report: never half a manifest.
    try:
        write_file_atomically(bundle / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on the device while writing '{bundle / MANIFEST}'; free space or choose another -o") from None
        raise
    return manifest


def verify_manifest(bundle: Path) -> dict:
    """Every file listed is present with its size and sha256, and nothing unlisted was
    added; the first difference is a one-line BadInput naming the file."""
    bundle = bundle.expanduser()
    if not bundle.is_dir():
        raise BadInput(f"bundle '{bundle}' does not exist or is not a directory; pass the -o directory of a build")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BadInput(f"'{bundle}' has no {MANIFEST}: not a complete bundle; rebuild it with `sparsedeploy build`")
    try:
        manifest = json.loads(path.read_text())
        listed = {entry["path"]: entry for entry in manifest["files"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"'{path}' is not a valid manifest; rebuild the bundle with `sparsedeploy build`") from None
    for relative, entry in listed.items():
        file = bundle / relative
        if not file.is_file():
            raise BadInput(f"bundle file '{relative}' is missing; the bundle is incomplete: rebuild it")
        if sha256_file(file) != entry["sha256"]:
            size = file.stat().st_size
            sizes = f" ({size} bytes, the manifest says {entry['bytes']})" if size != entry["bytes"] else ""
            raise BadInput(f"bundle file '{relative}' does not match its sha256 in {MANIFEST}{sizes}; "
                           "it was modified after the build: rebuild the bundle")
    extra = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                   if p.is_file() and p.name != MANIFEST and p.relative_to(bundle).as_posix() not in listed)
    if extra:
        raise BadInput(f"bundle file '{extra[0]}' is not in {MANIFEST}; remove it or rebuild the bundle")
    return manifest
