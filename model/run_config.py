"""Run configs as files: a recipe (YAML) is a `RunConfig` written out, key for key.

A recipe names the model (`model_type`), its options (`model:`), the training loop
(`train:`, `TrainConfig`), DGenCTR's stage 1 (`pretrain:`, `PretrainConfig`) and the run-level
settings (`field_mask_rate`, `transfer_keep`, ...). `ctr train --config FILE` starts from it,
the command's flags and then `--set key=value` override it, and the run's config.json keeps
the result under `run`, which `--config` reads back. The settings a benchmark figure came
from are then one file that `ctr train` and `benchmarks/quality.py` both read, not two copies
that can drift.

Unknown keys are refused at every level with the valid ones listed: a misspelt key that is
silently ignored trains a different model than the file says.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Recipes for a data set without its own: the synthetic ones, the settings measured on data
# that the Frappe_x1 rounds did not tune (docs/results.md, "Synthetic data").
GENERIC_DATASET = "synthetic"
SECTIONS = ("train", "pretrain", "model")


def recipe_dir() -> Path:
    """The shipped recipes: `model/recipes` in an installed package (pyproject maps the
    repository's top-level `recipes/` there), the top-level `recipes/` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no recipes directory next to {here}")


def shipped_recipes() -> list[str]:
    """Names such as `frappe_x1/dgenctr`, as `--config` accepts them."""
    root = recipe_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def find_recipe(name: str | Path) -> Path:
    """A recipe file by path, or a shipped recipe by name (`frappe_x1/dgenctr`,
    `recipes/frappe_x1/dgenctr.yaml`), so the documented command works from any directory."""
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name).removeprefix("recipes/").removesuffix(".yaml")
    shipped = recipe_dir() / f"{stem}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config '{name}' not found (neither a file nor a shipped recipe: {', '.join(shipped_recipes())})")


def default_recipe(dataset: str, model_type: str) -> Path | None:
    """The recommended recipe for a model on a data set: the data set's own, else the generic one."""
    root = recipe_dir()
    for ds in (dataset, GENERIC_DATASET):
        path = root / ds / f"{model_type}.yaml"
        if path.is_file():
            return path
    return None


def dataset_of(spec: str) -> str:
    """The data set a spec describes: a shipped spec's name, or a spec file's `name`."""
    path = Path(spec)
    if path.is_file():
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("name") or path.stem)
        except (ValueError, AttributeError):
            return path.stem
    return str(spec)


def load(path: str | Path) -> dict[str, Any]:
    """A recipe's keys, checked. A run's config.json is accepted too: its `run` section is the
    resolved config of that run."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    if "variant" in raw and "model_type" in raw:  # a run directory's config.json
        if not isinstance(raw.get("run"), Mapping):
            raise ValueError(f"{path}: this run's config.json predates recorded run configs (no `run` section); "
                             "rerun it from its recipe and flags")
        raw = raw["run"]
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    check_keys(raw, str(path))
    return raw


def parse_set(text: str) -> tuple[str, Any]:
    """`--set train.lr=3e-3` -> ("train.lr", "3e-3"): the value is read as a YAML scalar or
    list; `to_run_config` then types it by the dataclass field it lands on."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set expects KEY=VALUE with a dotted key such as train.lr, got '{text}'")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def assign(raw: dict[str, Any], key: str, value: Any, where: str = "--set") -> None:
    """Set a dotted key (`field_mask_rate`, `train.lr`, `model.d_model`) in a recipe dict."""
    parts = key.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
        raise ValueError(f"{where}: unknown key '{key}' (a key is top-level or {', '.join(SECTIONS)}.KEY; "
                         f"valid top-level keys: {', '.join(run_keys())})")
    if len(parts) == 1:
        if key in SECTIONS and isinstance(value, Mapping):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    else:
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ValueError(f"{where}: '{parts[0]}' is a section of keys, not {section!r}")
        section[parts[1]] = value
    check_keys(raw, where)


def run_keys() -> list[str]:
    from model.pipeline import RunConfig

    return [f.name for f in dataclasses.fields(RunConfig) if f.name != "out"]


def _section_keys(section: str) -> list[str]:
    from model.diffusion import PretrainConfig
    from model.trainer import TrainConfig

    cls = {"train": TrainConfig, "pretrain": PretrainConfig}[section]
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(raw: Mapping[str, Any], where: str) -> None:
    """Refuse keys no dataclass has, naming the bad key and listing the valid ones. The model's
    options are checked once its type is known (`model_options`)."""
    top = run_keys()
    for key, value in raw.items():
        if key not in top:
            hint = " (the run directory is given with --out)" if key == "out" else ""
            raise ValueError(f"{where}: unknown key '{key}'{hint} (valid keys: {', '.join(top)})")
        if key in ("train", "pretrain") and value is not None:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: '{key}' is a section of keys, got {value!r}")
            valid = _section_keys(key)
            for sub in value:
                if sub not in valid:
                    raise ValueError(f"{where}: unknown key '{key}.{sub}' (valid {key} keys: {', '.join(valid)})")
        if key == "model" and value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{where}: 'model' is a section of keys, got {value!r}")


def _describe(exc: Exception, prefix: str = "") -> str:
    """A pydantic ValidationError as one line per bad value: `train.lr: Input should be ...`."""
    lines = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        lines.append(f"{loc}: {err['msg']} (got {err['input']!r})")
    return "; ".join(lines)


def model_options(model_type: str, options: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """The options given for `model_type`'s config dataclass, typed; unknown ones are refused."""
    from pydantic import TypeAdapter, ValidationError

    from model.networks import MODELS

    if model_type not in MODELS:
        raise ValueError(f"unknown model '{model_type}' (choose from {', '.join(MODELS)})")
    cls = MODELS[model_type][0]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"{where}: model '{model_type}' has no option(s) {unknown} (valid model keys: {', '.join(valid)})")
    try:
        typed = TypeAdapter(cls).validate_python(dict(options))
    except ValidationError as exc:
        raise ValueError(f"{where}: {_describe(exc, 'model')}") from None
    return {k: getattr(typed, k) for k in options}


def to_run_config(raw: Mapping[str, Any], out: str, where: str = "config"):  # -> model.pipeline.RunConfig
    """Build the typed `RunConfig` from a recipe dict (file, flags and `--set` already merged).

    Values are typed by the field they land on (pydantic's lax mode), so YAML's `1e-3`, which
    PyYAML reads as a string, is the float 0.001 that `--lr 1e-3` gives. Two rules carry over
    from the command line: the run has one seed (`train.seed` follows `seed`), and a batch size
    left out is 1024 for DGenCTR and TrainConfig's 4096 for the baselines.
    """
    from pydantic import TypeAdapter, ValidationError

    from model.pipeline import RunConfig

    check_keys(raw, where)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items() if v is not None}  # null: the default
    for key, flag in (("model_type", "--model"), ("spec", "--spec"), ("data", "--data")):
        if data.get(key) in (None, ""):
            raise ValueError(f"no {key}: give {flag} or `{key}:` in the config")
    model_type = str(data["model_type"])
    data["model"] = model_options(model_type, data.get("model") or {}, where)
    train = data.setdefault("train", {})
    seed = data.get("seed", RunConfig.__dataclass_fields__["seed"].default)
    if "seed" in train and train["seed"] != seed:
        raise ValueError(f"{where}: train.seed {train['seed']} differs from seed {seed}: a run has one seed, set `seed`")
    train["seed"] = seed
    train.setdefault("batch_size", 1024 if model_type == "dgenctr" else 4096)
    data["out"] = str(out)
    try:
        return TypeAdapter(RunConfig).validate_python(data)
    except ValidationError as exc:
        raise ValueError(f"{where}: {_describe(exc)}") from None
