"""The model package (MODELS_DIR/NAME/VERSION/) and the repository that holds packages.

A package is three files: `model.onnx` (int64 tokens [batch, F] -> float32 probability
[batch]), `feature_spec.json` (the fitted FeatureSpec the model was trained with) and
`metadata.json`. `verify_package` is the one verifier: the exporter runs it before it
publishes and the service runs it before it loads a version, so a damaged or mismatched
package is refused with the same message everywhere.

Publishing is atomic: the package is written into a hidden temporary folder next to the
versions, verified there, then renamed to the next free integer version. A rename within
one file system is atomic, so a reader never sees a half-written version, and a rename onto
an existing non-empty folder fails, so a version is never overwritten even when two
exporters race.

This module must not import torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from model.logs import kv
from model.spec import NUM_RESERVED, OOV_ID, PAD_ID, FeatureSpec, SpecError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
SPEC_FILE = "feature_spec.json"
METADATA_FILE = "metadata.json"
PACKAGE_FILES = (ONNX_FILE, SPEC_FILE, METADATA_FILE)
INPUT_NAME = "tokens"
OUTPUT_NAME = "probability"
TMP_PREFIX = ".tmp-"
# Optional: combination counts for test-time paths, written by `ctr stats build --package`.
TEST_TIME_STATS_FILE = "test_time_stats.npz"
TEST_TIME_MANIFEST_FILE = "test_time_stats.json"
# Optional: SGCTR refinement graphs (sgctr/*.onnx) and their manifest, from `ctr sgctr export`.
SGCTR_MANIFEST_FILE = "sgctr.json"

# ONNX TensorProto element types we name in metadata (the graph must use exactly these).
_DTYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 11: "float64"}


class PackageError(ValueError):
    """A package that must not be published or served; the message says why."""


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk. `version` is None only for an unpublished (temporary) folder."""

    path: Path
    name: str
    version: int | None
    spec: FeatureSpec
    metadata: dict[str, Any] = field(repr=False)
    onnx_path: Path

    @property
    def model_type(self) -> str:
        return str(self.metadata.get("model_type", "unknown"))

    @property
    def input_name(self) -> str:
        return str(_io_entries(self.metadata, "inputs")[0]["name"])

    @property
    def output_name(self) -> str:
        return str(_io_entries(self.metadata, "outputs")[0]["name"])


# ---------------------------------------------------------------------- hashing / io
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Streamed, so a multi-GB embedding table is never read into memory at once."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def graph_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX ModelProto as [{name, dtype, shape}], dynamic dims as names.

    Initializers listed as graph inputs (older exporters do that) are not real inputs.
    """
    inits = {i.name for i in model.graph.initializer}

    def describe(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        shape: list[int | str] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or "?")
        return {"name": vi.name, "dtype": _DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"), "shape": shape}

    inputs = [describe(vi) for vi in model.graph.input if vi.name not in inits]
    outputs = [describe(vi) for vi in model.graph.output]
    return inputs, outputs


def graph_opset(model: Any) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _io_entries(metadata: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """`inputs`/`outputs` at the top level (this exporter) or under `io` (older packages)."""
    entries = metadata.get(key)
    if entries is None and isinstance(metadata.get("io"), Mapping):
        entries = metadata["io"].get(key)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) and "name" in e for e in entries):
        raise PackageError(f"metadata.json: '{key}' must be a non-empty list of {{name, dtype, shape}}")
    return [dict(e) for e in entries]


# ---------------------------------------------------------------------- verify
def verify_package(path: str | Path, *, smoke_run: bool = True) -> ModelPackage:
    """Check a package folder and return it, or raise PackageError saying what is wrong.

    Checks, cheapest first: the three files exist; metadata parses; model.onnx has the size and
    sha256 recorded in metadata (a truncated or swapped file fails here); the spec parses, is
    fitted and is the one the model was exported with; onnx.checker accepts the graph; the
    graph's single input is int64 [batch, num_fields] and its single output float32 [batch],
    with a dynamic batch axis, matching metadata. `smoke_run` then scores a few random valid
    rows (batch 1 and OOV rows included) with onnxruntime, which catches a spec whose
    vocabularies are larger than the model's embedding tables.
    """
    p = Path(path)
    if not p.is_dir():
        raise PackageError(f"{p}: not a package folder")
    missing = [f for f in PACKAGE_FILES if not (p / f).is_file()]
    if missing:
        raise PackageError(f"{p}: missing {', '.join(missing)}")

    metadata = _read_metadata(p / METADATA_FILE)
    onnx_path = p / ONNX_FILE
    want_sha = metadata.get("onnx_sha256")
    if not isinstance(want_sha, str) or len(want_sha) != 64:
        raise PackageError("metadata.json: onnx_sha256 is missing or not a sha256 hex digest")
    size = onnx_path.stat().st_size
    want_bytes = metadata.get("onnx_bytes")
    if isinstance(want_bytes, int) and size != want_bytes:
        raise PackageError(
            f"model.onnx is {size} bytes but metadata.json says {want_bytes}: the file is truncated or was replaced"
        )
    got_sha = file_sha256(onnx_path)
    if got_sha != want_sha:
        raise PackageError(f"model.onnx sha256 mismatch: file {got_sha[:16]}…, metadata.json {want_sha[:16]}…")

    try:
        spec = FeatureSpec.load(p / SPEC_FILE)
    except (SpecError, OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"feature_spec.json does not parse: {exc}") from exc
    if not spec.fitted:
        raise PackageError("feature_spec.json is not fitted (it has no vocabularies)")
    _check_spec_matches(spec, metadata, p / SPEC_FILE)

    model = _load_onnx(onnx_path)
    _check_io(model, spec, metadata)
    _check_test_time_stats(p, metadata)
    _check_sgctr(p, spec, metadata)

    pkg = ModelPackage(
        path=p,
        name=str(metadata.get("name") or p.parent.name),
        version=_folder_version(p, metadata),
        spec=spec,
        metadata=metadata,
        onnx_path=onnx_path,
    )
    if smoke_run:
        _smoke_run(pkg)
    return pkg


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"metadata.json is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise PackageError("metadata.json must hold a JSON object")
    return metadata


def _check_spec_matches(spec: FeatureSpec, metadata: Mapping[str, Any], spec_path: Path) -> None:
    """Structural checks first (they give the clearest message), then the spec's own sha256."""
    nf = metadata.get("num_fields")
    if nf is not None and int(nf) != spec.num_fields:
        raise PackageError(
            f"feature_spec.json has {spec.num_fields} fields but the model was exported for {nf}: "
            "a spec from another model"
        )
    names = metadata.get("field_names")
    if names is not None and list(names) != spec.field_names:
        raise PackageError(
            f"feature_spec.json fields {spec.field_names} differ from the model's {list(names)}: a spec from another model"
        )
    sizes = metadata.get("vocab_sizes")
    if sizes is not None and list(sizes) != spec.vocab_sizes:
        bad = [n for n, a, b in zip(spec.field_names, spec.vocab_sizes, sizes) if a != b]
        raise PackageError(
            f"feature_spec.json vocabularies differ from the model's (fields {bad}): a spec from another model"
        )
    want = metadata.get("feature_spec_sha256")
    if want is not None and file_sha256(spec_path) != want:
        raise PackageError("feature_spec.json sha256 mismatch: it is not the spec this model was exported with")


def _check_test_time_stats(p: Path, metadata: Mapping[str, Any]) -> None:
    """The optional test-time statistics (docs/test-time.md): absent is fine (the package
    serves plain); present, the file must match the sha256 and size in its manifest and the
    manifest must name this package's spec."""
    stats, manifest_path = p / TEST_TIME_STATS_FILE, p / TEST_TIME_MANIFEST_FILE
    if not stats.exists() and not manifest_path.exists():
        return
    if not (stats.is_file() and manifest_path.is_file()):
        raise PackageError(f"{TEST_TIME_STATS_FILE} and {TEST_TIME_MANIFEST_FILE} come together; one is missing")
    manifest = _read_metadata(manifest_path)
    if manifest.get("bytes") != stats.stat().st_size or manifest.get("sha256") != file_sha256(stats):
        raise PackageError(f"{TEST_TIME_STATS_FILE} does not match the sha256 in {TEST_TIME_MANIFEST_FILE}: damaged or replaced")
    want = manifest.get("feature_spec_sha256")
    if want is not None and want != metadata.get("feature_spec_sha256"):
        raise PackageError(f"{TEST_TIME_STATS_FILE} was built for another feature_spec.json")


def _check_sgctr(p: Path, spec: FeatureSpec, metadata: Mapping[str, Any]) -> None:
    """The optional SGCTR refinement graphs (docs/sgctr.md): absent is fine (the package serves
    plain); present, the manifest must name this package's model and spec, and every graph it
    lists must match its sha256 and have the plain graph's contract (tokens -> probability)."""
    manifest_path = p / SGCTR_MANIFEST_FILE
    if not manifest_path.exists():
        if (p / "sgctr").is_dir() and any((p / "sgctr").glob("*.onnx")):
            raise PackageError(f"sgctr/ holds refinement graphs but {SGCTR_MANIFEST_FILE} is missing")
        return
    manifest = _read_metadata(manifest_path)
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list):
        raise PackageError(f"{SGCTR_MANIFEST_FILE}: 'graphs' must be a list")
    for key in ("feature_spec_sha256", "onnx_sha256"):
        if manifest.get(key) is not None and manifest.get(key) != metadata.get(key):
            raise PackageError(f"{SGCTR_MANIFEST_FILE} was exported for another model ({key} differs)")
    for entry in graphs:
        rel = str(entry.get("file", "")) if isinstance(entry, Mapping) else ""
        path = (p / rel).resolve()
        if not rel.startswith("sgctr/") or p.resolve() not in path.parents or not path.is_file():
            raise PackageError(f"{SGCTR_MANIFEST_FILE} lists a refinement graph that is not in sgctr/: {rel!r}")
        if entry.get("bytes") != path.stat().st_size or entry.get("sha256") != file_sha256(path):
            raise PackageError(f"{rel} does not match the sha256 in {SGCTR_MANIFEST_FILE}: damaged or replaced")
        try:
            _check_io(_load_onnx(path), spec, metadata)
        except PackageError as exc:
            raise PackageError(f"{rel}: {exc}") from exc


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish or ValueError depending on damage
        raise PackageError(f"model.onnx does not load (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PackageError(f"model.onnx fails onnx.checker: {exc}") from exc
    return model


def _check_io(model: Any, spec: FeatureSpec, metadata: Mapping[str, Any]) -> None:
    inputs, outputs = graph_io(model)
    if len(inputs) != 1 or len(outputs) != 1:
        raise PackageError(
            f"model.onnx must have one input and one output, has inputs {[i['name'] for i in inputs]} "
            f"and outputs {[o['name'] for o in outputs]}"
        )
    gi, go = inputs[0], outputs[0]
    if gi["dtype"] != "int64" or len(gi["shape"]) != 2:
        raise PackageError(f"model.onnx input '{gi['name']}' is {gi['dtype']} {gi['shape']}, expected int64 [batch, F]")
    if go["dtype"] != "float32" or len(go["shape"]) != 1:
        raise PackageError(f"model.onnx output '{go['name']}' is {go['dtype']} {go['shape']}, expected float32 [batch]")
    if isinstance(gi["shape"][0], int) or isinstance(go["shape"][0], int):
        raise PackageError(f"model.onnx has a fixed batch size ({gi['shape']} -> {go['shape']}); the batch axis must be dynamic")
    if gi["shape"][1] != spec.num_fields:
        raise PackageError(
            f"model.onnx takes tokens [batch, {gi['shape'][1]}] but feature_spec.json has {spec.num_fields} fields: "
            "a spec from another model"
        )
    for key, graph_entry in (("inputs", gi), ("outputs", go)):
        meta_entries = _io_entries(metadata, key)
        if len(meta_entries) != 1:
            raise PackageError(f"metadata.json lists {len(meta_entries)} {key}, model.onnx has 1")
        m = meta_entries[0]
        if m["name"] != graph_entry["name"]:
            raise PackageError(f"metadata.json {key[:-1]} is named '{m['name']}', model.onnx's is '{graph_entry['name']}'")
        if "dtype" in m and m["dtype"] != graph_entry["dtype"]:
            raise PackageError(f"metadata.json says {key[:-1]} '{m['name']}' is {m['dtype']}, model.onnx has {graph_entry['dtype']}")
        if "shape" in m and not _same_shape(m["shape"], graph_entry["shape"]):
            raise PackageError(f"metadata.json says {key[:-1]} '{m['name']}' has shape {m['shape']}, model.onnx has {graph_entry['shape']}")
    opset = metadata.get("opset")
    if opset is not None and graph_opset(model) is not None and int(opset) != graph_opset(model):
        raise PackageError(f"metadata.json says opset {opset}, model.onnx uses {graph_opset(model)}")


def _same_shape(a: Any, b: list[int | str]) -> bool:
    """Fixed dims must be equal; a dynamic dim matches any dynamic dim (exporters name them differently)."""
    if not isinstance(a, list) or len(a) != len(b):
        return False
    return all((isinstance(x, str) and isinstance(y, str)) or x == y for x, y in zip(a, b))


def _folder_version(p: Path, metadata: Mapping[str, Any]) -> int | None:
    meta_version = metadata.get("version")
    if p.name.isdigit():
        if meta_version is not None and int(meta_version) != int(p.name):
            raise PackageError(f"metadata.json says version {meta_version} but the package folder is {p.name}")
        return int(p.name)
    return int(meta_version) if meta_version is not None else None


def random_valid_tokens(spec: FeatureSpec, rows: int, rng: np.random.Generator, oov_rate: float = 0.1) -> np.ndarray:
    """Rows the model can meet in service: real ids, OOV ids mixed in, never MASK.

    Shared by the smoke run here and the torch parity check, so both probe the same space.
    """
    sizes = np.array(spec.vocab_sizes, dtype=np.int64)
    low = np.full_like(sizes, NUM_RESERVED)
    # A field with no fitted values (everything OOV in training) only has reserved ids.
    high = np.maximum(sizes, NUM_RESERVED + 1)
    tokens = rng.integers(low, high, size=(rows, len(sizes)), dtype=np.int64)
    tokens = np.where(sizes[None, :] > NUM_RESERVED, tokens, OOV_ID)
    tokens[rng.random(tokens.shape) < oov_rate] = OOV_ID
    return tokens


def _smoke_run(pkg: ModelPackage) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        batch = random_valid_tokens(pkg.spec, 4, rng)
        batch[1, :] = OOV_ID
        batch[2, :] = PAD_ID  # the service pads batches with PAD rows
        for tokens in (batch[:1], batch):
            (out,) = sess.run([pkg.output_name], {pkg.input_name: tokens})
            if out.shape != (len(tokens),) or out.dtype != np.float32:
                raise PackageError(f"onnxruntime returned {out.dtype} {out.shape} for {len(tokens)} rows, expected float32 [{len(tokens)}]")
            if not np.all(np.isfinite(out)) or out.min() < 0.0 or out.max() > 1.0:
                raise PackageError(f"onnxruntime returned values outside [0, 1]: {out.tolist()}")
    except PackageError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        raise PackageError(f"onnxruntime cannot score this package: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------- repository
def list_versions(repo: str | Path, name: str) -> list[int]:
    """Published versions of a model, ascending. Temporary folders (.tmp-*) are not versions."""
    base = Path(repo) / name
    if not base.is_dir():
        return []
    return sorted(int(d.name) for d in base.iterdir() if d.name.isdigit() and d.is_dir())


def latest_version(repo: str | Path, name: str) -> int | None:
    versions = list_versions(repo, name)
    return versions[-1] if versions else None


def list_models(repo: str | Path) -> list[str]:
    """Names that have at least one published version."""
    base = Path(repo)
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".") and list_versions(base, d.name))


def package_path(repo: str | Path, name: str, version: int) -> Path:
    return Path(repo) / name / str(int(version))


# ---------------------------------------------------------------------- publish
def _check_name(name: str) -> None:
    if not name or name.startswith(".") or name.isdigit() or any(c in name for c in "/\\\0") or name in ("..",):
        raise PackageError(f"invalid model name {name!r}: use letters, digits, '-', '_' (not only digits)")


def write_package(
    repo: str | Path,
    name: str,
    onnx_file: str | Path,
    spec: FeatureSpec,
    metadata: Mapping[str, Any],
    *,
    version: int | None = None,
    smoke_run: bool = True,
) -> ModelPackage:
    """Publish onnx_file + spec + metadata as MODELS_DIR/NAME/VERSION and return the package.

    `version=None` takes the next free integer; an explicit version that exists is refused.
    The checksums, sizes, name, version and created_at are filled in here so no caller can
    get them wrong. On any failure the temporary folder is removed and nothing is published.
    """
    _check_name(name)
    if version is not None and int(version) < 1:
        raise PackageError(f"version must be a positive integer, got {version}")
    base = Path(repo) / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        shutil.copyfile(onnx_file, tmp / ONNX_FILE)
        spec.save(tmp / SPEC_FILE)
        for f in (ONNX_FILE, SPEC_FILE):
            _fsync(tmp / f)
        meta = dict(metadata)
        meta["name"] = name
        meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
        meta["onnx_sha256"] = file_sha256(tmp / ONNX_FILE)
        meta["onnx_bytes"] = (tmp / ONNX_FILE).stat().st_size
        meta["feature_spec_sha256"] = file_sha256(tmp / SPEC_FILE)
        meta["num_fields"] = spec.num_fields
        meta["field_names"] = spec.field_names
        meta["vocab_sizes"] = spec.vocab_sizes
        target = _next_version(base) if version is None else int(version)
        meta["version"] = target
        _write_json(tmp / METADATA_FILE, meta)
        verify_package(tmp, smoke_run=smoke_run)
        while True:
            final = base / str(target)
            if version is not None and final.exists():
                raise PackageError(f"{name}/{target} already exists in {repo}; versions are never overwritten")
            try:
                if final.exists():
                    raise FileExistsError(final)
                os.rename(tmp, final)
                break
            except OSError as exc:
                if not isinstance(exc, FileExistsError) and exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if version is not None:
                    raise PackageError(f"{name}/{target} already exists in {repo}; versions are never overwritten") from exc
                # Another exporter published this number first: take the next one.
                target = max(target, _next_version(base) - 1) + 1
                meta["version"] = target
                _write_json(tmp / METADATA_FILE, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("package published %s", kv(name=name, version=target, path=final, onnx_bytes=meta["onnx_bytes"]))
    return verify_package(final, smoke_run=False)


def _next_version(base: Path) -> int:
    versions = list_versions(base.parent, base.name)
    return (versions[-1] if versions else 0) + 1


def _fsync(path: Path) -> None:
    """Data on disk before the rename, so a crash cannot publish a version with empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
