"""Model registry: one name per network, its config dataclass and its constructor.

`config.json` stores `model_type` and the config as a dict; `build_model` turns them back
into the same network, which is all `run_io.load_run` needs to rebuild a trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from model.baselines import DCNv2, DCNv2Config, DeepFM, DeepFMConfig, DNN, DNNConfig
from model.dgenctr import DGenCTR, DGenCTRConfig

MODELS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "dgenctr": (DGenCTRConfig, DGenCTR),
    "dnn": (DNNConfig, DNN),
    "deepfm": (DeepFMConfig, DeepFM),
    "dcnv2": (DCNv2Config, DCNv2),
}


def model_config(model_type: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The config dataclass for `model_type`, with known keys overridden; unknown keys are refused."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model '{model_type}' (choose from {', '.join(MODELS)})")
    cls = MODELS[model_type][0]
    known = {f.name for f in dataclasses.fields(cls)}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model '{model_type}' has no option(s) {unknown} (known: {sorted(known)})")
    return cls(**overrides)


def build_model(model_type: str, cfg: Any, vocab_sizes: Sequence[int]) -> nn.Module:
    if isinstance(cfg, Mapping):
        cfg = model_config(model_type, cfg)
    return MODELS[model_type][1](vocab_sizes, cfg)
