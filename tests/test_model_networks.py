"""Every network scores int64 tokens [B, F] -> logits [B] and exports to ONNX with a dynamic batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.metrics import calibration, evaluate, gauc
from model.networks import MODELS, build_model, model_config

VOCAB = [10, 25, 7, 40]


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_forward_shape_and_batch_independence(model_type):
    torch.manual_seed(0)
    model = build_model(model_type, {}, VOCAB).eval()
    tokens = torch.stack([torch.randint(0, v, (9,)) for v in VOCAB], dim=1)
    out = model(tokens)
    assert out.shape == (9,) and out.dtype == torch.float32
    # A row's score does not depend on the other rows of the batch (eval mode).
    assert torch.allclose(model(tokens[:1]), out[:1], atol=1e-5)


def test_dgenctr_options_and_unknown_options():
    cfg = model_config("dgenctr", {"readout": "concat", "head_hidden": 8, "generator": "mlp", "time_embedding": True, "embedding_dim": 8, "d_model": 16, "heads": 2})
    model = build_model("dgenctr", cfg, VOCAB).eval()
    assert model(torch.full((3, 4), 3)).shape == (3,)
    with pytest.raises(ValueError, match="no option"):
        model_config("dnn", {"nonsense": 1})
    with pytest.raises(ValueError, match="unknown model"):
        model_config("xgboost", {})


def test_dgenctr_head_dropout_is_apart_from_the_encoders():
    from torch import nn

    def rates(module):
        return [m.p for m in module.modules() if isinstance(m, nn.Dropout)]

    tower = {"d_model": 16, "heads": 2, "dropout": 0.0, "head_hidden": [8, 8], "head_batch_norm": True}
    model = build_model("dgenctr", model_config("dgenctr", {**tower, "head_dropout": 0.3}), VOCAB)
    assert set(rates(model.blocks)) == {0.0} and rates(model.label_head) == [0.3, 0.3]
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.label_head.modules())
    # Left out, the head follows the encoder's dropout as it always did.
    legacy = build_model("dgenctr", model_config("dgenctr", {**tower, "dropout": 0.1}), VOCAB)
    assert rates(legacy.label_head) == [0.1, 0.1]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["dnn", "deepfm", "dcnv2"])
def test_baseline_field_masking_trains_on_each_fields_mask_row_and_scores_on_every_field(model_type):
    import torch.nn.functional as F

    from model.spec import MASK_ID
    from model.trainer import BCEObjective

    torch.manual_seed(0)
    model = build_model(model_type, {"dropout": 0.0, "batch_norm": False}, VOCAB)
    tokens = torch.stack([torch.randint(3, v, (4096,)) for v in VOCAB], dim=1)
    labels = (torch.rand(4096) < 0.3).float()
    loss, stats = BCEObjective(model, field_mask_rate=0.25, seed=5)(tokens, labels)

    # The same seeded draw: each field's token becomes MASK_ID (its own row of the table) at the rate.
    mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(5)) < 0.25
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    expected = F.binary_cross_entropy_with_logits(model(tokens.masked_fill(mask, MASK_ID)), labels)
    assert torch.isclose(loss, expected) and stats == {}
    loss.backward()
    table = model.embedding.table.weight.grad
    mask_rows = model.embedding.offsets + MASK_ID
    assert table[mask_rows].abs().sum(dim=1).gt(0).all()  # every field's [MASK] row is trained

    plain, _ = BCEObjective(model, seed=5)(tokens, labels)  # rate 0: the scoring view itself
    assert torch.equal(plain, F.binary_cross_entropy_with_logits(model(tokens), labels))


def test_dgenctr_exports_to_onnx_with_dynamic_batch(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("dgenctr", {"d_model": 16, "heads": 2, "layers": 1}, VOCAB).eval()
    example = torch.full((2, len(VOCAB)), 3, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["tokens"], output_names=["logits"],
                                dynamic_shapes={"tokens": {0: batch}})
    path = tmp_path / "m.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 17):
        tokens = torch.stack([torch.randint(0, v, (b,)) for v in VOCAB], dim=1)
        got = sess.run(None, {"tokens": tokens.numpy()})[0]
        np.testing.assert_allclose(got, model(tokens).detach().numpy(), atol=1e-5)


def test_metrics_by_hand():
    y = np.array([1, 0, 1, 0, 1, 1])
    p = np.array([0.9, 0.1, 0.4, 0.6, 0.8, 0.7])
    g = np.array(["a", "a", "b", "b", "c", "c"])  # group c has only clicks: left out of GAUC
    m = evaluate(y, p, g)
    assert m["auc"] == pytest.approx(7 / 8)
    assert gauc(y, p, g) == pytest.approx((2 * 1.0 + 2 * 0.0) / 4)
    assert calibration(y, p) == pytest.approx(np.mean(p) / np.mean(y))
    assert m["logloss"] > 0


def _concat_embed(vocab, d: int = 16) -> torch.nn.Module:
    torch.manual_seed(3)
    cfg = model_config("dgenctr", {"d_model": d, "heads": 2, "layers": 1, "readout": "concat_embed", "head_hidden": 8})
    return build_model("dgenctr", cfg, vocab).eval()


@torch.no_grad()
def test_dgenctr_concat_embed_head_reads_the_field_embeddings_beside_the_states():
    """Why: the skip readout must put the DNN's input path (each field's value embedding) into the
    label head, with the [MASK] embedding where stage 1 masked a field (no masked value leaks in)."""
    model = _concat_embed(VOCAB)
    f, d = len(VOCAB), 16
    assert model.label_head[0].in_features == d * (2 * f + 1)
    tokens = torch.stack([torch.randint(3, v, (6,)) for v in VOCAB], dim=1)
    h = model.hidden(tokens)
    assert h.shape == (6, 2 * f + 1, d)
    assert torch.allclose(h[:, f + 1 :], model.skip_norm(model.embedding(tokens)), atol=1e-6)
    assert torch.allclose(model(tokens), model.label_head(h.flatten(1)).squeeze(-1), atol=1e-6)
    # The head hears the skip: changing one field's embedding row moves the score even with the
    # encoder's states held fixed.
    states = h[:, : f + 1]
    other = model.hidden(tokens.roll(1, dims=0))[:, f + 1 :]
    assert not torch.allclose(model.label_logit(torch.cat([states, other], 1)), model(tokens))
    # Stage 1's view: a masked field's skip row is its [MASK] embedding, the value never enters.
    mask = torch.zeros(6, f + 1, dtype=torch.bool)
    mask[:, 1] = True
    hm = model.hidden(tokens, torch.zeros(6), mask)
    assert torch.allclose(hm[:, f + 1 + 1], model.skip_norm(model.mask_embedding[1]).expand(6, d), atol=1e-6)
    assert model.generate(hm).shape == (6, f, d)


@torch.no_grad()
def test_dgenctr_concat_embed_refines_through_the_skip_path():
    """Why: SGCTR's Refiner scores re-defined embeddings via encode -> label_logit; with the skip
    readout the re-defined values must reach the head, and zero passes must stay the plain model."""
    from model.refine import Refiner
    from testtime.sgctr import SgctrConfig

    model = _concat_embed(VOCAB)
    names = [f"f{i}" for i in range(len(VOCAB))]
    tokens = torch.stack([torch.randint(3, v, (20,)) for v in VOCAB], dim=1)
    assert torch.equal(Refiner(model, SgctrConfig(passes=0), names)(tokens), model(tokens))
    ref = Refiner(model, SgctrConfig(passes=1, ratio=1.0, weight="zero"), names)
    v = ref.refine_values(tokens)
    assert torch.allclose(ref(tokens), model.label_logit(model.encode(v)))
    assert not torch.allclose(ref(tokens), model(tokens))


def test_dgenctr_concat_embed_exports_with_the_same_interface_and_parity(synth_spec, tmp_path):
    """Why: the skip readout must not change the served graph's contract (int64 tokens in, one
    probability per row out) and must export at the exporter's fp32 parity."""
    from export.onnx_export import export_model
    from export.parity import check_parity

    model = _concat_embed(synth_spec.vocab_sizes)
    pkg = export_model(model, synth_spec, tmp_path, "skip", model_type="dgenctr", metrics={"valid": {"auc": 0.5}},
                       config={"data": {"fingerprint": "abc"}})
    meta = pkg.metadata
    assert meta["inputs"][0]["name"] == "tokens" and meta["inputs"][0]["shape"][1] == synth_spec.num_fields
    assert [o["name"] for o in meta["outputs"]] == ["probability"] and meta["parity"]["ok"]
    report = check_parity(model, pkg.onnx_path, synth_spec, atol=1e-5, seed=7)
    assert report.ok and report.max_abs_diff <= 1e-5
