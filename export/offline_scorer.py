"""Score raw rows (not tokens) with a model package: FeatureSpec.encode -> onnxruntime.

This is the one path from raw feature values to a probability outside training. The
service scores through it and the offline/online parity test scores through it, so the two
can only disagree if their inputs differ. It must not import torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from export.package import ModelPackage, verify_package
from model.logs import kv

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def default_threads() -> int:
    """onnxruntime's default (one thread per core) oversubscribes a pod that shares its cores
    with a web server and encoders; cap it and let callers raise it explicitly."""
    return max(1, min(4, os.cpu_count() or 1))


class OfflineScorer:
    """A verified package plus one onnxruntime session, scoring raw rows in chunks.

    `providers` is tried in order; onnxruntime silently drops one it cannot load, so the one
    really in use is exposed as `.provider`.
    """

    def __init__(
        self,
        package_or_path: ModelPackage | str | Path,
        providers: list[str] | tuple[str, ...] | None = None,
        *,
        intra_op_threads: int | None = None,
        chunk_rows: int = 8192,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort

        if isinstance(package_or_path, ModelPackage):
            self.package = package_or_path
        else:
            self.package = verify_package(package_or_path, smoke_run=False) if verify else _unverified(package_or_path)
        self.spec = self.package.spec
        self.chunk_rows = int(chunk_rows)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads or default_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(self.package.onnx_path), opts, providers=list(providers or DEFAULT_PROVIDERS)
        )
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        log.info(
            "offline scorer ready %s",
            kv(model=self.package.name, version=self.package.version, provider=self.provider, threads=opts.intra_op_num_threads),
        )

    def encode(self, rows: Any) -> np.ndarray:
        """Unknown categories, missing values and absent columns become OOV, as in serving.

        A list of rows that are all empty dicts has no columns at all, from which the spec
        cannot tell the row count; it is encoded as that many all-missing rows.
        """
        tokens = self.spec.encode(rows, strict=False)
        if isinstance(rows, list) and len(tokens) != len(rows):
            tokens = self.spec.encode({"_row": [None] * len(rows)}, strict=False)
        return tokens

    def score_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.spec.num_fields:
            raise ValueError(f"tokens must be [rows, {self.spec.num_fields}], got {list(tokens.shape)}")
        out = np.empty(len(tokens), dtype=np.float32)
        for start in range(0, len(tokens), self.chunk_rows):
            chunk = tokens[start : start + self.chunk_rows]
            (probs,) = self.session.run([self.output_name], {self.input_name: chunk})
            out[start : start + len(chunk)] = probs
        return out

    def score_rows(self, rows: Any) -> np.ndarray:
        """Probabilities float32 [rows] for a DataFrame, dict of columns or list of row dicts."""
        return self.score_tokens(self.encode(rows))


def _unverified(path: str | Path) -> ModelPackage:
    """For a caller that has just verified the folder itself (e.g. right after publishing)."""
    import json

    from model.spec import FeatureSpec

    p = Path(path)
    meta = json.loads((p / "metadata.json").read_text(encoding="utf-8"))
    return ModelPackage(
        path=p,
        name=str(meta.get("name") or p.parent.name),
        version=int(p.name) if p.name.isdigit() else meta.get("version"),
        spec=FeatureSpec.load(p / "feature_spec.json"),
        metadata=meta,
        onnx_path=p / "model.onnx",
    )
