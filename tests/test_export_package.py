"""Model package format, repository, verifier and offline scorer.

The ONNX model is real: a tiny embedding + MLP torch network exported by the project's own
exporter and run by a real onnxruntime session. Every refusal case damages a copy of a good
package in one way and checks that the message names the problem.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.package import (
    PackageError,
    latest_version,
    list_models,
    list_versions,
    verify_package,
    write_package,
)
from model.readers import load_splits
from model.spec import FeatureSpec

torch = pytest.importorskip("torch")


class TinyCTR(torch.nn.Module):
    """Embeddings per field -> MLP -> logit: the smallest network shaped like the real ones."""

    def __init__(self, vocab_sizes: list[int], dim: int = 4) -> None:
        super().__init__()
        self.emb = torch.nn.ModuleList([torch.nn.Embedding(n, dim) for n in vocab_sizes])
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim * len(vocab_sizes), 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([e(tokens[:, i]) for i, e in enumerate(self.emb)], dim=1)
        return self.mlp(x).squeeze(-1)


@pytest.fixture(scope="session")
def tiny_model(synth_spec: FeatureSpec) -> TinyCTR:
    torch.manual_seed(0)
    return TinyCTR(synth_spec.vocab_sizes).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: TinyCTR, synth_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_onnx, optimize_onnx

    d = tmp_path_factory.mktemp("tiny_onnx")
    return optimize_onnx(export_onnx(tiny_model, synth_spec, d / "raw.onnx"), d / "model.onnx")


def _meta() -> dict:
    return {
        "model_type": "tiny",
        "precision": "fp32",
        "metrics": {"valid": {"auc": 0.5}},
        "data_fingerprint": "test",
        "opset": None,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", 12]}],
        "outputs": [{"name": "probability", "dtype": "float32", "shape": ["batch"]}],
        "exporter_version": "test",
    }


def _publish(repo: Path, tiny_onnx: Path, spec: FeatureSpec, name: str = "ctr", **kw):
    meta = _meta()
    meta["inputs"][0]["shape"] = ["batch", spec.num_fields]
    meta.pop("opset")
    return write_package(repo, name, tiny_onnx, spec, meta, **kw)


@pytest.fixture()
def good(tmp_path: Path, tiny_onnx: Path, synth_spec: FeatureSpec) -> Path:
    return _publish(tmp_path / "models", tiny_onnx, synth_spec).path


def _other_spec(synth_dir: Path, synth_spec: FeatureSpec, keep_fields: bool) -> FeatureSpec:
    """A fitted spec of another model: same fields refitted on other rows, or fewer fields."""
    train = load_splits(synth_dir, ("train",))["train"]
    if keep_fields:
        return FeatureSpec.load("synthetic").fit(train.sample(n=500, random_state=1))
    fields = [f for f in FeatureSpec.load("synthetic").fields if f.kind != "cross"][:-1]
    return FeatureSpec(name="other", fields=fields, label=synth_spec.label).fit(train)


# ---------------------------------------------------------------------- publish + repository
def test_publish_writes_a_verified_package(good: Path, synth_spec: FeatureSpec) -> None:
    assert good.name == "1" and sorted(p.name for p in good.iterdir()) == ["feature_spec.json", "metadata.json", "model.onnx"]
    pkg = verify_package(good)
    assert (pkg.name, pkg.version, pkg.spec.to_dict()) == ("ctr", 1, synth_spec.to_dict())
    meta = json.loads((good / "metadata.json").read_text())
    for key in ("name", "version", "model_type", "metrics", "data_fingerprint", "onnx_sha256", "inputs", "outputs",
                "precision", "created_at", "exporter_version", "num_fields", "field_names"):
        assert key in meta, key
    assert meta["created_at"].endswith("Z") and meta["num_fields"] == synth_spec.num_fields
    assert pkg.input_name == "tokens" and pkg.output_name == "probability"


def test_two_publishes_get_distinct_versions_and_never_overwrite(tmp_path: Path, tiny_onnx: Path, synth_spec: FeatureSpec) -> None:
    repo = tmp_path / "models"
    a = _publish(repo, tiny_onnx, synth_spec)
    b = _publish(repo, tiny_onnx, synth_spec)
    assert (a.version, b.version) == (1, 2)
    before = (a.path / "metadata.json").read_bytes()
    with pytest.raises(PackageError, match="already exists"):
        _publish(repo, tiny_onnx, synth_spec, version=1)
    assert (a.path / "metadata.json").read_bytes() == before
    assert _publish(repo, tiny_onnx, synth_spec, version=7).version == 7
    assert _publish(repo, tiny_onnx, synth_spec).version == 8
    assert list_versions(repo, "ctr") == [1, 2, 7, 8] and latest_version(repo, "ctr") == 8
    assert list_models(repo) == ["ctr"] and list_versions(repo, "nope") == [] and latest_version(repo, "nope") is None
    assert not [p for p in (repo / "ctr").iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path, tiny_onnx: Path, synth_spec: FeatureSpec) -> None:
    repo, results, errors = tmp_path / "models", [], []
    barrier = threading.Barrier(6)

    def publish() -> None:
        try:
            barrier.wait()
            results.append(_publish(repo, tiny_onnx, synth_spec, smoke_run=False).version)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [1, 2, 3, 4, 5, 6]
    for v in results:  # each folder's metadata names its own version
        assert verify_package(repo / "ctr" / str(v)).version == v


def test_a_package_that_fails_verification_is_not_published(tmp_path: Path, tiny_onnx: Path, synth_spec: FeatureSpec) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(tiny_onnx.read_bytes()[:200])
    with pytest.raises(PackageError, match="does not load"):
        _publish(tmp_path / "models", bad, synth_spec)
    assert list((tmp_path / "models" / "ctr").iterdir()) == []


@pytest.mark.parametrize("name", ["", "..", "7", "a/b", ".hidden"])
def test_bad_model_names_are_refused(tmp_path: Path, tiny_onnx: Path, synth_spec: FeatureSpec, name: str) -> None:
    with pytest.raises(PackageError, match="invalid model name"):
        _publish(tmp_path / "models", tiny_onnx, synth_spec, name=name)


# ---------------------------------------------------------------------- refusals
def _rewrite_meta(pkg: Path, **changes) -> None:
    meta = json.loads((pkg / "metadata.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (pkg / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("missing", ["model.onnx", "feature_spec.json", "metadata.json"])
def test_missing_file_is_refused(good: Path, missing: str) -> None:
    (good / missing).unlink()
    with pytest.raises(PackageError, match=f"missing {missing}"):
        verify_package(good)


def test_truncated_model_is_refused(good: Path) -> None:
    data = (good / "model.onnx").read_bytes()
    (good / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="truncated"):
        verify_package(good)


def test_truncated_model_with_matching_checksum_is_refused_by_the_onnx_check(good: Path) -> None:
    """A file cut short before its checksum was taken: only parsing the graph can tell."""
    from export.package import file_sha256

    data = (good / "model.onnx").read_bytes()
    (good / "model.onnx").write_bytes(data[: len(data) - 100])
    _rewrite_meta(good, onnx_sha256=file_sha256(good / "model.onnx"), onnx_bytes=len(data) - 100)
    with pytest.raises(PackageError, match=r"model.onnx does not load \(truncated or corrupt\)"):
        verify_package(good)


def test_wrong_sha256_is_refused(good: Path) -> None:
    _rewrite_meta(good, onnx_sha256="0" * 64)
    with pytest.raises(PackageError, match="sha256 mismatch"):
        verify_package(good)


def test_malformed_metadata_is_refused(good: Path) -> None:
    (good / "metadata.json").write_text("{not json")
    with pytest.raises(PackageError, match="metadata.json is not valid JSON"):
        verify_package(good)


def test_unparsable_spec_is_refused(good: Path) -> None:
    (good / "feature_spec.json").write_text('{"fields": 3}')
    with pytest.raises(PackageError, match="feature_spec.json does not parse"):
        verify_package(good)


@pytest.mark.parametrize("keep_fields", [False, True], ids=["fewer-fields", "other-vocabularies"])
def test_spec_from_another_model_is_refused(good: Path, synth_dir: Path, synth_spec: FeatureSpec, keep_fields: bool) -> None:
    _other_spec(synth_dir, synth_spec, keep_fields).save(good / "feature_spec.json")
    with pytest.raises(PackageError, match="a spec from another model"):
        verify_package(good)


def test_spec_from_another_model_is_refused_by_the_graph_alone(good: Path, synth_dir: Path, synth_spec: FeatureSpec) -> None:
    """Even with the metadata hints stripped, the graph's input width gives it away."""
    _other_spec(synth_dir, synth_spec, keep_fields=False).save(good / "feature_spec.json")
    _rewrite_meta(good, num_fields=None, field_names=None, vocab_sizes=None, feature_spec_sha256=None)
    with pytest.raises(PackageError, match=r"takes tokens \[batch, 12\] but feature_spec.json has 10 fields"):
        verify_package(good)


def test_metadata_io_that_disagrees_with_the_graph_is_refused(good: Path) -> None:
    _rewrite_meta(good, inputs=[{"name": "x", "dtype": "int64", "shape": ["batch", 12]}])
    with pytest.raises(PackageError, match="named 'x', model.onnx's is 'tokens'"):
        verify_package(good)


def test_renamed_version_folder_is_refused(good: Path) -> None:
    moved = good.parent / "5"
    shutil.copytree(good, moved)
    with pytest.raises(PackageError, match="says version 1 but the package folder is 5"):
        verify_package(moved)


def test_service_style_metadata_with_io_block_verifies(tmp_path: Path, synth_spec: FeatureSpec) -> None:
    """Packages whose metadata keeps inputs/outputs under `io` (the service's test packages) pass."""
    from tests.testing import tiny_package

    path, _ = tiny_package(tmp_path / "models", "svc", 1, synth_spec)
    pkg = verify_package(path)
    assert pkg.version == 1 and pkg.input_name == "tokens"


# ---------------------------------------------------------------------- offline scorer
def test_offline_scorer_scores_raw_rows_like_torch(good: Path, tiny_model: TinyCTR, synth_dir: Path, synth_spec: FeatureSpec) -> None:
    from export.offline_scorer import OfflineScorer
    from export.parity import torch_probabilities

    scorer = OfflineScorer(good, intra_op_threads=1)
    assert scorer.provider == "CPUExecutionProvider"
    rows = pd.read_parquet(synth_dir / "valid.parquet").head(300)
    probs = scorer.score_rows(rows)
    assert probs.dtype == np.float32 and probs.shape == (300,)
    want = torch_probabilities(tiny_model, synth_spec.encode(rows))
    assert np.max(np.abs(probs - want)) <= 1e-5
    as_dicts = rows.drop(columns=["label", "p_true"]).head(5).to_dict("records")
    np.testing.assert_array_equal(scorer.score_rows(as_dicts), probs[:5])
    assert scorer.score_rows([]).shape == (0,)


def test_offline_scorer_turns_unknown_and_missing_values_into_oov(good: Path, synth_spec: FeatureSpec) -> None:
    from export.offline_scorer import OfflineScorer
    from model.spec import OOV_ID

    scorer = OfflineScorer(good, chunk_rows=2)
    rows = [{"user_id": "never-seen"}, {}, {"item_id": None}]
    got = scorer.score_rows(rows)  # chunk_rows=2: two onnxruntime calls stitched together
    assert got.shape == (3,) and np.isfinite(got).all()
    # Crosses of OOV inputs hash to a bucket, not OOV; every other field is OOV, as in serving.
    tokens = scorer.encode(rows)
    plain = [i for i, f in enumerate(synth_spec.fields) if f.kind != "cross"]
    assert (tokens[:, plain] == OOV_ID).all()
    np.testing.assert_array_equal(got, scorer.score_tokens(tokens))
    assert len(set(got.tolist())) == 1  # three indistinguishable rows
    with pytest.raises(ValueError, match="tokens must be"):
        scorer.score_tokens(np.zeros((2, 3), dtype=np.int64))


def test_offline_scorer_refuses_a_damaged_package(good: Path) -> None:
    from export.offline_scorer import OfflineScorer

    _rewrite_meta(good, onnx_sha256="f" * 64)
    with pytest.raises(PackageError, match="sha256 mismatch"):
        OfflineScorer(good)


# ---------------------------------------------------------------------- cli + torch-free import
def test_cli_verify_refuses_with_the_reason(good: Path, capsys) -> None:
    from ctr.cli import main

    assert main(["export", "verify", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    _rewrite_meta(good, onnx_sha256="0" * 64)
    assert main(["export", "verify", str(good)]) == 1
    assert "REFUSED" in (err := capsys.readouterr().err) and "sha256 mismatch" in err
    assert main(["export", "--repo", str(good.parent)]) == 2  # publish needs --run and --name
    assert "missing --run --name" in capsys.readouterr().err


def test_service_side_modules_import_without_torch(good: Path) -> None:
    """The serving image has no torch: the package, scorer and CLI modules must not need it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import export.package, export.offline_scorer, export.cli\n"
        "from export.offline_scorer import OfflineScorer\n"
        f"print(OfflineScorer({str(good)!r}).score_rows([{{}}]).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1,)"


# ---------------------------------------------------------------------- test-time statistics
def _stats_run(folder: Path, spec: FeatureSpec, data: Path, *, with_stats: bool = True) -> Path:
    """What `ctr export` reads from a run for the statistics: its config (the data dir) and,
    as `ctr stats build --run` leaves it, test_time_stats.npz with its manifest."""
    from testtime.stats import STATS_FILE, StatsConfig, build_from_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"data": {"dir": str(data)}}))
    if with_stats:
        build_from_file(spec, next(data.glob("train.*")), StatsConfig(width_log2=10)).save(folder / STATS_FILE)
    return folder


def test_export_copies_the_runs_statistics_and_verify_checks_them(tmp_path: Path, synth_dir: Path) -> None:
    """`ctr train`, `ctr stats build --run`, `ctr export`: the package carries the run's file."""
    import subprocess
    import sys

    from ctr.cli import main
    from testtime.matt import TestTimeConfig, load_matt
    from testtime.stats import MANIFEST_FILE, STATS_FILE

    run, repo = tmp_path / "run", tmp_path / "models"
    repo_root = Path(__file__).resolve().parent.parent
    for argv in (["train", "--spec", "synthetic", "--data", str(synth_dir), "--out", str(run), "--model", "dnn",
                  "--epochs", "1", "--max-rows", "2000", "--batch-size", "512", "--hidden", "8", "--embedding-dim", "4",
                  "--no-progress", "--threads", "1", "--log-level", "WARNING"],
                 ["stats", "build", "--run", str(run), "--width-log2", "10"]):
        out = subprocess.run([sys.executable, "-m", "ctr", *argv], cwd=repo_root, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert main(["export", "--run", str(run), "--repo", str(repo), "--name", "m"]) == 0
    pkg = repo / "m" / "1"
    meta = json.loads((pkg / "metadata.json").read_text())
    assert (pkg / STATS_FILE).read_bytes() == (run / STATS_FILE).read_bytes()
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    assert manifest["feature_spec_sha256"] == meta["feature_spec_sha256"] and manifest["onnx_sha256"] == meta["onnx_sha256"]
    assert manifest["copied_from"] == str((run / STATS_FILE).resolve())
    assert main(["export", "verify", str(pkg)]) == 0
    assert load_matt(pkg, TestTimeConfig(paths=2)).positive_rate > 0  # a MATT variant can load it

    bad = bytearray((pkg / STATS_FILE).read_bytes())
    bad[len(bad) // 2] ^= 0x01
    (pkg / STATS_FILE).write_bytes(bytes(bad))
    assert main(["export", "verify", str(pkg)]) == 1

    # --stats none: the next version leaves them out, though the run has them.
    assert main(["export", "--run", str(run), "--repo", str(repo), "--name", "m", "--stats", "none"]) == 0
    assert not (repo / "m" / "2" / STATS_FILE).exists() and not (repo / "m" / "2" / MANIFEST_FILE).exists()


def test_stats_build_counts_the_train_split_when_the_run_has_none(good: Path, tmp_path: Path, synth_dir: Path,
                                                                 synth_spec: FeatureSpec, tiny_onnx: Path) -> None:
    from export.cli import attach_stats
    from testtime.stats import MANIFEST_FILE, STATS_FILE, ComboStats, StatsConfig

    run = _stats_run(tmp_path / "run", synth_spec, synth_dir, with_stats=False)
    # The default copies only: no file in the run, none in the package.
    assert attach_stats(good, run)["status"] == "none" and not (good / STATS_FILE).exists()
    done = attach_stats(good, run, "build", config=StatsConfig(width_log2=10))
    assert done["status"] == "built" and done["from"].endswith("train.parquet")
    stats = ComboStats.load(good / STATS_FILE, synth_spec)
    assert stats.rows == len(pd.read_parquet(synth_dir / "train.parquet"))
    meta = json.loads((good / "metadata.json").read_text())
    assert json.loads((good / MANIFEST_FILE).read_text())["feature_spec_sha256"] == meta["feature_spec_sha256"]
    verify_package(good)
    assert attach_stats(good, run, "build")["status"] == "present"  # never rebuilt over a good file
    # Without the run's data and without --stats-data, `build` says what to pass.
    (run / "config.json").write_text("{}")
    other = _publish(tmp_path / "models2", tiny_onnx, synth_spec).path
    with pytest.raises(ValueError, match="--stats-data"):
        attach_stats(other, run, "build")
    assert attach_stats(other, run, "build", data=synth_dir, config=StatsConfig(width_log2=10))["status"] == "built"


def test_a_runs_statistics_for_another_spec_are_not_copied(good: Path, tmp_path: Path, synth_dir: Path,
                                                          synth_spec: FeatureSpec) -> None:
    from export.cli import attach_stats
    from testtime.stats import STATS_FILE

    run = _stats_run(tmp_path / "run", _other_spec(synth_dir, synth_spec, keep_fields=False), synth_dir)
    with pytest.raises(ValueError, match="cannot be used: statistics were built for another spec"):
        attach_stats(good, run)
    assert not (good / STATS_FILE).exists()
    verify_package(good)  # the published package is untouched
