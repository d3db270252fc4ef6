"""Offline CTR metrics: AUC, logloss, GAUC and calibration.

scikit-learn computes AUC and logloss; GAUC groups with pandas and reuses the same AUC, so
there is no hand-written ranking code to get wrong.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

METRIC_NAMES = ("auc", "logloss", "gauc", "calibration")


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")  # undefined with one class
    return float(roc_auc_score(labels, probs))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(log_loss(labels, p, labels=[0, 1]))


def gauc(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None) -> float:
    """AUC per group weighted by the group's impressions, over groups with both labels.

    A user who only ever clicked (or never did) says nothing about ranking, so such
    groups are left out rather than counted as 0.5.
    """
    if groups is None:
        return float("nan")
    df = pd.DataFrame({"y": np.asarray(labels), "p": np.asarray(probs), "g": np.asarray(groups)})
    stats = df.groupby("g", sort=False)["y"].agg(["min", "max", "size"])
    keep = stats.index[(stats["min"] != stats["max"])]
    if len(keep) == 0:
        return float("nan")
    sub = df[df["g"].isin(keep)]
    total, weight = 0.0, 0
    for _, part in sub.groupby("g", sort=False):
        n = len(part)
        total += n * roc_auc_score(part["y"].to_numpy(), part["p"].to_numpy())
        weight += n
    return float(total / weight)


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean prediction over mean label: 1.0 is calibrated, >1 over-predicts clicks."""
    mean_label = float(np.mean(labels))
    return float(np.mean(probs) / mean_label) if mean_label > 0 else float("nan")


def evaluate(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None, with_gauc: bool = True) -> dict[str, float]:
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "gauc": gauc(labels, probs, groups) if with_gauc else float("nan"),
        "calibration": calibration(labels, probs),
    }
