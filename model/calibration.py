"""Post-hoc probability calibration: Platt scaling of the network's logit, fitted on valid.

Why it exists: early stopping picks the epoch with the best validation *AUC*, and by then a
CTR network has usually gone on sharpening its logits past the point that minimises logloss
(on Frappe_x1 the fitted scale is 0.56-0.70 for every model: the raw scores are
over-confident). Ranking does not care, but bidding and pacing multiply by p(click), so an
over-confident 0.999 costs money. A two-parameter map sigmoid(a * logit + b) with a > 0 keeps
the order (AUC and GAUC are unchanged) and fixes the confidence; two numbers fitted on tens
of thousands of validation rows cannot overfit the way retraining would.

The calibration lives in the run's config.json and is applied by `Calibrated`, a wrapper
that `model.run_io.load_run` puts around the network, so the exported ONNX graph, the parity
check and every consumer of a run score with the same calibrated logit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

log = logging.getLogger(__name__)

CALIBRATION_METHODS: tuple[str, ...] = ("platt", "none")
MIN_ROWS = 100  # below this, or with one class only, two parameters are not worth fitting


@dataclass(frozen=True)
class PlattScaling:
    """p = sigmoid(scale * logit + bias); scale > 0 so the ranking is untouched."""

    scale: float
    bias: float
    rows: int
    fitted_on: str = "valid"
    method: str = "platt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlattScaling":
        if d.get("method", "platt") != "platt":
            raise ValueError(f"unknown calibration method {d.get('method')!r}")
        scale, bias = float(d["scale"]), float(d["bias"])
        if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
            raise ValueError(f"calibration needs a finite scale > 0 and a finite bias, got scale={scale} bias={bias}")
        return cls(scale=scale, bias=bias, rows=int(d.get("rows", 0)), fitted_on=str(d.get("fitted_on", "valid")))


def fit_platt(logits: np.ndarray, labels: np.ndarray, fitted_on: str = "valid") -> PlattScaling | None:
    """Unregularised logistic regression of the label on the logit (scikit-learn's lbfgs).

    Returns None when there is nothing sound to fit: too few rows, one class only, or a fit
    whose scale is not positive (a network whose scores anti-correlate with clicks should
    fail loudly in its AUC, not be silently flipped here).
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) < MIN_ROWS or y.min() == y.max() or not np.isfinite(z).all():
        log.info("calibration_skipped rows=%d reason=%s", len(y), "too few rows or one class or non-finite logits")
        return None
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-10)
    lr.fit(z, y)
    scale, bias = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(bias)):
        log.info("calibration_skipped rows=%d reason=scale %s is not positive", len(y), scale)
        return None
    return PlattScaling(scale=scale, bias=bias, rows=int(len(y)), fitted_on=fitted_on)


class Calibrated(nn.Module):
    """The network with its Platt map on the logit: still returns a logit, so `predict`, the
    ONNX export (sigmoid on top) and parity need no special case. Scale and bias are buffers,
    constant-folded into the exported graph as two float32 numbers."""

    def __init__(self, model: nn.Module, calibration: PlattScaling) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor(calibration.scale, dtype=torch.float32), persistent=False)
        self.register_buffer("bias", torch.tensor(calibration.bias, dtype=torch.float32), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).float() * self.scale + self.bias
