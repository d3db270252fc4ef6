"""SGCTR's served path: score token rows with a package's refinement graph (onnxruntime, no torch).

The refinement itself (which fields are re-defined, how observed and generated embeddings
are blended, R passes, then the click read with the label masked) is a torch module,
`model.refine.Refiner`, exported once per R into the package (`export.onnx_export.
export_refinement`). This module holds what the service and `ctr evaluate` need without
torch: the settings (`SgctrConfig`, one `test_time:` block), the package manifest that
names each exported graph, and `SgctrScorer`, which picks the graph for the settings asked
for and scores batches with it in one onnxruntime call per batch.

A graph is exported for fixed settings; the manifest keys each graph by the settings that
change its arithmetic (`SgctrConfig.graph_key`), so asking for settings that were not
exported fails with the list of what was, instead of silently scoring something else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from export.package import SGCTR_MANIFEST_FILE

SGCTR_DIR = "sgctr"  # package sub-folder of the refinement graphs
SGCTR_MANIFEST = SGCTR_MANIFEST_FILE  # in the package folder, beside model.onnx
MANIFEST_FORMAT = 1


class SgctrConfig(BaseModel):
    """Per-variant SGCTR settings (`test_time: {method: sgctr, ...}`, `--set` in `ctr evaluate`).

    Defaults are the research note's recommendation (docs/sgctr.md); the measured ablations
    are in the same document.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["sgctr"] = "sgctr"
    passes: int = Field(1, ge=0, le=3, description="R refinement passes; 0 scores plain")
    # How a pass learns each field's self-consistency (docs/sgctr.md, "Cost"):
    #   sweep:  `groups` denoiser runs per pass, run g masking the fields with index = g mod groups;
    #           every field is scored with itself masked. Cost R * groups + 1 denoiser runs.
    #   rotate: one denoiser run per pass, pass r masking group r mod groups; only that group's
    #           fields are scored and may be re-defined. Cost R + 1 runs.
    score: Literal["sweep", "rotate"] = "sweep"
    groups: int = Field(2, ge=2, le=64, description="field groups masked together (fields: index mod groups)")
    selection: Literal["targeted", "random", "all"] = "targeted"
    ratio: float = Field(0.3, gt=0.0, le=1.0, description="share of the scored fields re-defined per pass")
    # Blend weight w_k of the observed embedding: the generator's probability of the observed
    # value over the field's full vocabulary ("full"), over the batch's values of the field
    # ("batch": depends on the batch, so not reproducible across batchings), or 0 ("zero":
    # replace the selected fields outright), or "relative": the full-vocabulary probability over
    # that of the generator's most probable value (1 when the observed value is its first guess;
    # a diffuse generator over a large vocabulary then does not pull every value to its mean).
    weight: Literal["full", "relative", "batch", "zero"] = "full"
    # The generated embedding: the generator's posterior mean over the candidates of `weight`
    # ("mean"; full vocabulary for weight=zero) or G_k's direction at the observed norm ("direction").
    generated: Literal["mean", "direction"] = "mean"
    tau: float = Field(0.1, gt=0.0, description="temperature of the cosine softmax (stage 1's tau)")
    fields: list[str] | None = Field(None, description="only these fields may be re-defined (default all)")

    @field_validator("fields")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("fields, when given, must name at least one field")
        return v

    @property
    def active(self) -> bool:
        return self.passes > 0

    def graph_settings(self) -> dict[str, Any]:
        """The settings baked into an exported graph, passes excluded (one graph per R)."""
        return self.model_dump(exclude={"method", "passes"})

    def graph_key(self) -> str:
        """Short stable id of `graph_settings()`: graphs of one setting share it across R."""
        text = json.dumps(self.graph_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def graph_file(self) -> str:
        return f"{SGCTR_DIR}/{self.graph_key()}-r{self.passes}.onnx"

    def runs_per_row(self, num_fields: int) -> int:
        """Denoiser runs per scored row (the plain model is 1)."""
        groups = min(self.groups, num_fields)
        per_pass = groups if self.score == "sweep" else 1
        return self.passes * per_pass + 1


def read_manifest(package_dir: str | Path) -> dict[str, Any] | None:
    path = Path(package_dir) / SGCTR_MANIFEST
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("graphs"), list):
        raise ValueError(f"{path}: not an SGCTR manifest (no 'graphs' list)")
    return doc


def find_graph(package_dir: str | Path, config: SgctrConfig) -> dict[str, Any]:
    """The manifest entry of the graph exported for `config`, or a ValueError listing what exists."""
    doc = read_manifest(package_dir)
    if doc is None:
        raise FileNotFoundError(
            f"{package_dir} has no {SGCTR_MANIFEST}: export the refinement graphs with "
            f"`ctr sgctr export --run RUN_DIR --package {package_dir}`")
    key = config.graph_key()
    for entry in doc["graphs"]:
        if entry.get("key") == key and int(entry.get("passes", -1)) == config.passes:
            return entry
    have = sorted({f"passes={e.get('passes')} {json.dumps(e.get('settings'), sort_keys=True)}" for e in doc["graphs"]})
    raise ValueError(f"no refinement graph for passes={config.passes} {json.dumps(config.graph_settings(), sort_keys=True)} "
                     f"in {package_dir}; exported: {'; '.join(have)}")


@dataclass
class SgctrCounters:
    rows: int = 0
    runs: int = 0  # denoiser runs (a plain row is one)

    def as_dict(self) -> dict[str, float]:
        return {"rows": self.rows, "denoiser_runs": self.runs,
                "runs_per_row": self.runs / self.rows if self.rows else 0.0}


@dataclass
class SgctrScorer:
    """One onnxruntime session over a refinement graph: tokens [B, F] -> refined probability [B]."""

    session: Any
    config: SgctrConfig
    entry: dict[str, Any]
    runs_per_row: int
    counters: SgctrCounters = field(default_factory=SgctrCounters)

    def score(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if not len(tokens):
            return np.empty(0, np.float32)
        (probs,) = self.session.run(None, {"tokens": tokens})
        self.counters.rows += len(tokens)
        self.counters.runs += len(tokens) * self.runs_per_row
        return probs


def graph_path(package_dir: str | Path, config: SgctrConfig) -> tuple[Path, dict[str, Any]]:
    """The checked file of the graph exported for `config` and its manifest entry.

    For callers that open the session with their own onnxruntime settings (the service opens
    it as it opens model.onnx); raises as `find_graph` does, or ValueError on a sha256 mismatch.
    """
    from export.package import file_sha256

    p = Path(package_dir)
    entry = find_graph(p, config)
    path = p / entry["file"]
    if file_sha256(path) != entry.get("sha256"):
        raise ValueError(f"{path} does not match the sha256 in {SGCTR_MANIFEST}: damaged or replaced")
    return path, entry


def load_sgctr(package_dir: str | Path, config: SgctrConfig, *, threads: int | None = None,
               providers: list[str] | None = None) -> SgctrScorer:
    """The scorer of a package's refinement graph for `config` (checked against its sha256)."""
    import onnxruntime as ort

    path, entry = graph_path(package_dir, config)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or 1)
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
    return SgctrScorer(session, config, entry, int(entry.get("runs_per_row", config.passes + 1)))
