"""The run directory: what `ctr train` writes and `ctr export` reads.

```
RUN_DIR/
  model.safetensors    state_dict (safetensors: nothing is unpickled on load)
  feature_spec.json    the fitted FeatureSpec
  config.json          {"model_type", "model": {...}, "train": {...}, "data": {...},
                        "calibration": {"method": "platt", "scale", "bias", ...} or null,
                        "run": the resolved RunConfig (`ctr train --config` reads it back),
                        "recipe": {"file", "set"} it was resolved from}
  metrics.json         {"model", "valid": {...}, "test": {...}, "train_seconds"}
```

Everything needed to rebuild the network is in these four files, so export needs nothing
else: `load_run` rebuilds the model from config.json and the spec's vocabulary sizes, and wraps
it in its post-hoc calibration when the run fitted one (`model.calibration`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.calibration import Calibrated, PlattScaling
from model.networks import MODELS, build_model
from model.spec import FeatureSpec

WEIGHTS = "model.safetensors"
SPEC = "feature_spec.json"
CONFIG = "config.json"
METRICS = "metrics.json"


@dataclass
class LoadedRun:
    model: nn.Module  # in eval mode; `Calibrated` around the network when the run fitted a calibration
    spec: FeatureSpec  # fitted
    config: dict[str, Any]
    metrics: dict[str, Any]


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every JSON reader accepts the file."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies: safetensors refuses views and shared storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | Path) -> None:
    save_file(state_dict_for_saving(model), str(path))


def save_run(run_dir: str | Path, model: nn.Module, spec: FeatureSpec, config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write the four run files. `config` must carry "model_type" and "model" (the network config)."""
    if config.get("model_type") not in MODELS:
        raise ValueError(f"config.model_type must be one of {sorted(MODELS)}, got {config.get('model_type')!r}")
    if not spec.fitted:
        raise ValueError("save_run needs the fitted FeatureSpec")
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS)
    spec.save(out / SPEC)
    _write_json(out / CONFIG, config)
    _write_json(out / METRICS, metrics)
    return out


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    _write_json(Path(run_dir) / METRICS, metrics)


def load_run(run_dir: str | Path, map_location: str = "cpu") -> LoadedRun:
    """Rebuild the trained network from a run directory, in eval mode, with its fitted spec."""
    d = Path(run_dir)
    for name in (WEIGHTS, SPEC, CONFIG):
        if not (d / name).exists():
            raise FileNotFoundError(f"run directory {d} has no {name}")
    config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    spec = FeatureSpec.load(d / SPEC)
    model_type = config.get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{d / CONFIG}: unknown model_type {model_type!r}")
    model = build_model(model_type, config.get("model", {}), spec.vocab_sizes)
    state = load_file(str(d / WEIGHTS), device=map_location)
    model.load_state_dict(state, strict=True)
    if config.get("calibration"):
        try:
            model = Calibrated(model, PlattScaling.from_dict(config["calibration"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{d / CONFIG}: bad calibration {config['calibration']!r}: {exc}") from exc
    model.eval()
    metrics_path = d / METRICS
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    return LoadedRun(model=model, spec=spec, config=config, metrics=metrics)
