"""The exporter: graph contract, fp32 parity at 1e-5, and the fp16 / int8 variants.

Uses the tiny network from test_export_package (real torch, real onnxruntime); the trained
model types are covered in test_export_models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.offline_scorer import OfflineScorer  # noqa: E402
from export.onnx_export import ExportOptions, export_model  # noqa: E402
from export.package import verify_package  # noqa: E402
from export.parity import ParityError, check_parity, torch_probabilities  # noqa: E402
from model.spec import OOV_ID, FeatureSpec  # noqa: E402
from tests.test_export_package import TinyCTR  # noqa: E402


@pytest.fixture(scope="module")
def model(synth_spec: FeatureSpec) -> TinyCTR:
    torch.manual_seed(1)
    return TinyCTR(synth_spec.vocab_sizes, dim=6).eval()


@pytest.fixture(scope="module")
def fp32_package(model: TinyCTR, synth_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("models")
    return export_model(model, synth_spec, repo, "tiny", model_type="tiny", metrics={"valid": {"auc": 0.5}},
                        config={"data": {"fingerprint": "abc123"}})


def test_graph_contract(fp32_package, synth_spec: FeatureSpec) -> None:
    import onnx

    graph = onnx.load(str(fp32_package.onnx_path))
    meta = fp32_package.metadata
    assert meta["inputs"][0]["name"] == "tokens" and meta["inputs"][0]["dtype"] == "int64"
    batch_dim, width = meta["inputs"][0]["shape"]
    assert isinstance(batch_dim, str) and width == synth_spec.num_fields
    assert meta["outputs"] == [{"name": "probability", "dtype": "float32", "shape": [batch_dim]}]
    assert meta["opset"] == next(o.version for o in graph.opset_import if o.domain == "")
    # Saved at onnxruntime's BASIC level: standard ONNX ops only, portable to every provider.
    assert {n.domain for n in graph.graph.node} <= {""}
    assert meta["data_fingerprint"] == "abc123" and meta["metrics"]["valid"]["auc"] == 0.5
    assert meta["parity"]["ok"] and meta["parity"]["max_abs_diff"] <= 1e-5 and 1 in meta["parity"]["batches"]


def test_fp32_parity_on_fresh_rows_at_1e_5(fp32_package, model: TinyCTR, synth_spec: FeatureSpec) -> None:
    seed = int(np.random.SeedSequence().entropy % (2**32))  # fresh rows every run, seed reported on failure
    report = check_parity(model, fp32_package.onnx_path, synth_spec, atol=1e-5, seed=seed)
    assert report.ok and report.max_abs_diff <= 1e-5 and 1 in report.batches and report.rows > 300, seed


def test_any_batch_size_and_oov_rows_score(fp32_package, model: TinyCTR, synth_spec: FeatureSpec) -> None:
    scorer = OfflineScorer(fp32_package, intra_op_threads=1)
    for rows in (1, 3, 1000):
        tokens = np.full((rows, synth_spec.num_fields), OOV_ID, dtype=np.int64)
        got = scorer.score_tokens(tokens)
        assert got.shape == (rows,)
        np.testing.assert_allclose(got, torch_probabilities(model, tokens), atol=1e-5)


def test_parity_check_catches_a_different_model(fp32_package, synth_spec: FeatureSpec) -> None:
    torch.manual_seed(99)
    other = TinyCTR(synth_spec.vocab_sizes, dim=6).eval()
    with pytest.raises(ParityError, match="differ by"):
        check_parity(other, fp32_package.onnx_path, synth_spec)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_reports_its_auc_change(model: TinyCTR, synth_spec: FeatureSpec, synth_dir: Path, tmp_path: Path,
                                                  fp32_package, precision: str) -> None:
    pkg = export_model(model, synth_spec, tmp_path, "tiny", model_type="tiny",
                       options=ExportOptions(precision=precision, valid_data=synth_dir))
    meta = json.loads((pkg.path / "metadata.json").read_text())
    ev = meta["precision_eval"]
    assert meta["precision"] == precision and ev["split"] == "valid" and ev["rows"] > 0
    assert np.isfinite(ev["auc_delta"]) and abs(ev["auc_delta"]) < 0.01
    assert ev["auc_delta"] == pytest.approx(ev["auc"] - ev["auc_fp32"])
    assert meta["parity"]["max_abs_diff"] <= 1e-5  # the fp32 graph it came from
    # Still int64 tokens in, float32 probabilities out, and smaller than fp32.
    assert meta["inputs"][0]["dtype"] == "int64" and meta["outputs"][0]["dtype"] == "float32"
    assert pkg.onnx_path.stat().st_size < fp32_package.onnx_path.stat().st_size
    verify_package(pkg.path)
    if precision == "int8":
        import onnx

        ops = {n.op_type for n in onnx.load(str(pkg.onnx_path)).graph.node}
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "DequantizeLinear"}


def test_unknown_precision_is_refused(model: TinyCTR, synth_spec: FeatureSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        export_model(model, synth_spec, tmp_path, "tiny", model_type="tiny", options=ExportOptions(precision="bf16"))  # type: ignore[arg-type]
    assert not (tmp_path / "tiny").exists()
