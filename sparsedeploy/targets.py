"""Target profiles: `targets/NAME.toml` says which backend builds for the target, which
precisions and sparsity patterns it accepts, the check workload and the gates. The code
holds none of those numbers.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sparsedeploy.backends import backend_names, get_backend
from sparsedeploy.errors import BadInput

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
PATTERNS = ("dense", "unstructured", "2:4", "4:8", "structured")
REQUIRED_KEYS = ("backend", "device", "precision", "precisions", "patterns")


def targets_dir() -> Path:
    """SPARSEDEPLOY_TARGETS, else the repository's `targets/` beside the package."""
    explicit = os.environ.get("SPARSEDEPLOY_TARGETS")
    return Path(explicit) if explicit else Path(__file__).resolve().parents[1] / "targets"


@dataclass(frozen=True)
class TargetProfile:
    name: str
    path: Path
    backend: str
    device: str
    precision: str
    precisions: tuple[str, ...]
    patterns: tuple[str, ...]
    description: str = ""
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def check(self) -> dict:
        return self.raw.get("check", {})

    @property
    def gates(self) -> dict:
        return self.raw.get("gates", {})


def parse_profile(path: Path) -> TargetProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"target profile '{path}' is not valid TOML ({error}); fix the file") from None
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise BadInput(f"target profile '{path}' lacks {', '.join(missing)}; add them (see targets/onnxruntime.toml)")
    if raw["backend"] not in backend_names():
        raise BadInput(f"target profile '{path}' names unknown backend '{raw['backend']}'; known: {', '.join(backend_names())}")
    for key, allowed in (("precisions", PRECISIONS), ("patterns", PATTERNS)):
        unknown = [value for value in raw[key] if value not in allowed]
        if unknown:
            raise BadInput(f"target profile '{path}' has unknown {key} {unknown}; allowed: {', '.join(allowed)}")
    if raw["precision"] not in raw["precisions"]:
        raise BadInput(f"target profile '{path}': default precision '{raw['precision']}' is not in its precisions")
    return TargetProfile(
        name=path.stem,
        path=path,
        backend=raw["backend"],
        device=raw["device"],
        precision=raw["precision"],
        precisions=tuple(raw["precisions"]),
        patterns=tuple(raw["patterns"]),
        description=raw.get("description", ""),
        raw=raw,
    )


def load_profiles() -> list[TargetProfile]:
    directory = targets_dir()
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise BadInput(f"no target profiles in '{directory}'; set SPARSEDEPLOY_TARGETS to the folder with NAME.toml files")
    return [parse_profile(path) for path in files]


def load_profile(name: str) -> TargetProfile:
    profiles = {profile.name: profile for profile in load_profiles()}
    if name not in profiles:
        raise BadInput(f"unknown target '{name}'; available targets: {', '.join(sorted(profiles))}")
    return profiles[name]


def describe_targets() -> list[dict]:
    """Per target: can it run on this machine, and why not. Shape fixed by the contract."""
    described = []
    for profile in load_profiles():
        availability = get_backend(profile.backend).availability()
        described.append(
            {
                "name": profile.name,
                "backend": profile.backend,
                "device": profile.device,
                "available": availability.available,
                "reason": availability.reason,
                "precisions": list(profile.precisions),
                "patterns": list(profile.patterns),
                "profile": profile.raw,
            }
        )
    return described
