"""Outputs appear whole or not at all: every command that writes a directory (a pruned
checkpoint, a build bundle) fills a hidden staging directory beside the destination and
renames it into place only when everything succeeded."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsedeploy.errors import BadInput


def check_output_dir(output: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output directory before any work is done; returns it resolved."""
    output = output.expanduser().resolve()
    for source in inputs:
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            raise BadInput(f"output '{output}' would overlap the input '{source}'; choose another -o directory")
    if output.exists() and not force:
        raise BadInput(f"output '{output}' already exists; choose another -o or pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise BadInput(f"output '{output}' is a file; choose a directory path for -o")
    if output.parent.exists() and not output.parent.is_dir():
        raise BadInput(f"'{output.parent}' is a file, so '{output}' cannot be created; choose another -o")
    return output


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``output`` (an existing
    one only after the new one is complete); on any error or Ctrl-C it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(retired / output.name)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader sees the old file or the new
    one, never half of either."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
