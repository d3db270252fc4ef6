"""torch eager vs onnxruntime on fresh random token rows.

The rows are drawn fresh (seeded from the OS unless a seed is given, and the seed is
reported) within each field's vocabulary, with OOV ids mixed in, one all-OOV row and batch
sizes from 1 up, so a graph that was specialised to the trace batch, or that mishandles an
id the example never contained, shows up as a difference rather than passing by luck.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.package import random_valid_tokens
from model.logs import kv
from model.spec import OOV_ID, FeatureSpec

log = logging.getLogger(__name__)

# Batch 1 is the edge case that breaks graphs specialised to the trace batch; the others
# cover odd sizes and a multi-block batch.
PARITY_BATCHES = (1, 2, 7, 64, 333)
FP32_ATOL = 1e-5


class ParityError(ValueError):
    """onnxruntime and torch disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    mean_abs_diff: float
    rows: int
    batches: tuple[int, ...]
    seed: int
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batches"] = list(self.batches)
        d["ok"] = self.ok
        return d


class ProbabilityHead(torch.nn.Module):
    """sigmoid(logits): the exported graph and the torch reference both return probabilities."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(tokens).float())


def parity_tokens(spec: FeatureSpec, batches: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for b in batches:
        t = random_valid_tokens(spec, b, rng)
        if b > 1:
            t[-1, :] = OOV_ID  # an entity the feature store does not know
        out.append(t)
    return out


def torch_probabilities(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    head = model if isinstance(model, ProbabilityHead) else ProbabilityHead(model)
    head.eval()
    with torch.inference_mode():
        return head(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))).cpu().numpy().astype(np.float32)


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | Path,
    spec: FeatureSpec,
    *,
    atol: float = FP32_ATOL,
    batches: tuple[int, ...] = PARITY_BATCHES,
    seed: int | None = None,
    raise_on_fail: bool = True,
) -> ParityReport:
    """Max |torch - onnxruntime| over fresh rows; raises ParityError above `atol` by default."""
    import onnxruntime as ort

    seed = secrets.randbits(32) if seed is None else int(seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    diffs = []
    for tokens in parity_tokens(spec, batches, seed):
        (ort_p,) = sess.run([out_name], {in_name: tokens})
        ref = torch_probabilities(model, tokens)
        if ort_p.shape != ref.shape:
            raise ParityError(f"batch {len(tokens)}: onnxruntime returned shape {ort_p.shape}, torch {ref.shape}")
        diffs.append(np.abs(ort_p.astype(np.float64) - ref.astype(np.float64)))
    all_d = np.concatenate(diffs)
    report = ParityReport(
        max_abs_diff=float(all_d.max()),
        mean_abs_diff=float(all_d.mean()),
        rows=int(all_d.size),
        batches=tuple(batches),
        seed=seed,
        atol=float(atol),
    )
    log.info("parity %s", kv(max_abs_diff=report.max_abs_diff, rows=report.rows, seed=seed, atol=atol, ok=report.ok))
    if raise_on_fail and not report.ok:
        raise ParityError(
            f"onnxruntime and torch differ by {report.max_abs_diff:.3g} > {atol:g} on {report.rows} rows (seed {seed})"
        )
    return report
