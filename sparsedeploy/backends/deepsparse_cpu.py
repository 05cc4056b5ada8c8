"""DeepSparse (Neural Magic) on x86 CPU, in its own virtual environment.

DeepSparse pins old onnx/numpy releases, so it lives in `.venv-deepsparse/` and is
driven through a subprocess; this module never imports it into our process.
"""

import os
import platform
import subprocess
import tempfile
from pathlib import Path

from sparsedeploy.backends.base import Availability, Backend, register_backend

REPO_ROOT = Path(__file__).resolve().parents[2]


def deepsparse_python() -> Path:
    explicit = os.environ.get("SPARSEDEPLOY_DEEPSPARSE_PYTHON")
    return Path(explicit) if explicit else REPO_ROOT / ".venv-deepsparse" / "bin" / "python"


@register_backend
class DeepSparseBackend(Backend):
    name = "deepsparse"
    engine = "deepsparse"
    device = "cpu"

    def availability(self) -> Availability:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return Availability(False, f"DeepSparse runs on x86-64 CPUs only; this machine is {platform.machine()}")
        python = deepsparse_python()
        if not python.is_file():
            return Availability(
                False,
                f"DeepSparse is not installed: its separate environment {python.parent.parent} does not exist "
                "(set SPARSEDEPLOY_DEEPSPARSE_PYTHON to a Python that has deepsparse)",
            )
        # -I and a neutral cwd: a stray package in the caller's directory (say a
        # brotli source tree) must not shadow one of DeepSparse's dependencies.
        probe = subprocess.run(
            [str(python), "-I", "-c", "import deepsparse; print(deepsparse.__version__)"],
            capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir(),
            env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            return Availability(False, f"deepsparse does not import in {python} ({last}); recreate that environment")
        return Availability(True, f"deepsparse {probe.stdout.strip()} in {python.parent.parent}")
