"""Reading model packages from the repository (MODELS_DIR/NAME/VERSION/...).

The checks themselves belong to `export.package.verify_package`, the one verifier, so a
package is refused the same way at export time and at load time. This module only adapts
its answer to what the service needs: the spec, the ONNX path and the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.spec import FeatureSpec


class PackageRefused(Exception):
    """A package that must not be served (corrupt, incomplete or incompatible)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: int
    path: Path
    spec: FeatureSpec
    onnx_path: Path
    metadata: dict[str, Any]
    input_name: str = "tokens"
    output_name: str = "probability"


def list_versions(repo: str | Path, name: str) -> list[int]:
    """Published versions (integer folder names; temporary folders are skipped)."""
    try:
        from export.package import list_versions as _list

        return sorted(int(v) for v in _list(repo, name))
    except ImportError:
        base = Path(repo) / name
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(repo: str | Path, name: str) -> int | None:
    versions = list_versions(repo, name)
    return versions[-1] if versions else None


def load_package(repo: str | Path, name: str, version: int) -> Package:
    path = Path(repo) / name / str(version)
    if not path.is_dir():
        raise FileNotFoundError(f"no model package {name}/{version} in {repo}")
    try:
        from export.package import verify_package
    except ImportError:
        verify_package = _basic_verify
    try:
        verify_package(path)
        metadata = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
        spec = FeatureSpec.load(path / "feature_spec.json")
    except Exception as exc:  # whatever the verifier raises, the answer is "refused"
        raise PackageRefused(f"{name}/{version}: {exc}") from exc
    if not spec.fitted:
        raise PackageRefused(f"{name}/{version}: feature_spec.json is not fitted")
    io = metadata.get("io") or {}
    return Package(
        name=name,
        version=int(version),
        path=path,
        spec=spec,
        onnx_path=path / "model.onnx",
        metadata=metadata,
        input_name=_first_name(metadata.get("inputs") or io.get("inputs"), metadata.get("input_name"), "tokens"),
        output_name=_first_name(metadata.get("outputs") or io.get("outputs"), metadata.get("output_name"), "probability"),
    )


def _first_name(entries: Any, fallback: Any, default: str) -> str:
    if isinstance(entries, list) and entries:
        first = entries[0]
        if isinstance(first, dict) and "name" in first:
            return str(first["name"])
        if isinstance(first, str):
            return first
    if isinstance(entries, dict) and entries:
        return str(next(iter(entries)))
    return str(fallback or default)


def _basic_verify(path: Path) -> None:
    """Stand-in used only when the export package is not installed: files and checksum."""
    import hashlib

    for f in ("model.onnx", "feature_spec.json", "metadata.json"):
        if not (path / f).is_file():
            raise PackageRefused(f"missing {f}")
    meta = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    want = meta.get("onnx_sha256")
    if want and hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest() != want:
        raise PackageRefused("model.onnx does not match its sha256 in metadata.json")
