"""Stage-1 pieces: the masking schedule, the sampled-softmax loss, weight transfer (model/transfer.py) and the joint stage 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.diffusion import (
    FineTuneObjective,
    PretrainConfig,
    PretrainObjective,
    mask_prob,
    sample_mask,
    sampled_softmax_loss,
)
from model.dgenctr import DGenCTR, DGenCTRConfig
from model.transfer import transfer

F_FIELDS = 10
ROWS = 40_000


def test_linear_schedule_masks_a_uniform_number_of_elements():
    # With lambda(t) = t and t ~ U(0, 1), the count of masked elements among n is uniform on
    # 0..n; forcing one element into the clean rows moves the k=0 mass onto k=1.
    g = torch.Generator().manual_seed(0)
    m = sample_mask(ROWS, F_FIELDS, "linear", True, g)
    n = F_FIELDS + 1
    assert m.shape == (ROWS, n) and m.dtype == torch.bool
    counts = torch.bincount(m.sum(1), minlength=n + 1).double() / ROWS
    assert counts[0] == 0
    assert counts[1] == pytest.approx(2 / (n + 1), abs=0.01)
    for k in range(2, n + 1):
        assert counts[k] == pytest.approx(1 / (n + 1), abs=0.01)
    # The label is masked like any other element.
    per_col = m.double().mean(0)
    assert per_col[-1] == pytest.approx(per_col[:-1].mean().item(), abs=0.02)


def test_cosine_schedule_and_label_flag():
    g = torch.Generator().manual_seed(1)
    m = sample_mask(ROWS, F_FIELDS, "cosine", False, g)
    assert not m[:, -1].any(), "label must stay visible when mask_label is False"
    assert m[:, :-1].any(dim=1).all()
    # E[1 - cos(pi t / 2)] = 1 - 2/pi; the forced element adds a little on top.
    frac = m[:, :-1].double().mean().item()
    assert 1 - 2 / math.pi <= frac <= 1 - 2 / math.pi + 0.03
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(mask_prob(t, "linear"), t)
    assert torch.allclose(mask_prob(t, "cosine"), torch.tensor([0.0, 1 - math.cos(math.pi / 4), 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_prob(t, "square")


def test_sampled_softmax_on_a_hand_built_batch():
    # Three rows, one field; rows 0 and 2 hold the same value (token 5), row 1 holds token 6.
    cand = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])
    gen = torch.tensor([[[2.0, 0.0]], [[1.0, 0.0]], [[0.0, 3.0]]])  # cosine ignores the length
    tokens = torch.tensor([[5], [6], [5]])
    mask = torch.tensor([[True], [True], [False]])
    loss_sum, correct, masked = sampled_softmax_loss(gen, cand, tokens, mask, tau=1.0, num_negatives=3)
    # Row 0: positive cos 1; negatives: row 1 (cos 0); rows 0 and 2 are duplicates of the truth.
    row0 = math.log(math.e**1 + math.e**0) - 1
    # Row 1: positive cos 0; negatives: rows 0 and 2 (cos 1 each); row 1 itself is removed.
    row1 = math.log(1 + 2 * math.e)
    assert loss_sum.item() == pytest.approx(row0 + row1, rel=1e-6)
    assert correct.tolist() == [1.0] and masked.tolist() == [2.0]
    # Temperature scales the logits.
    loss_t, _, _ = sampled_softmax_loss(gen, cand, tokens, mask, tau=0.5, num_negatives=3)
    expected = (math.log(math.e**2 + 1) - 2) + math.log(1 + 2 * math.e**2)
    assert loss_t.item() == pytest.approx(expected, rel=1e-6)


def _tiny(seed: int = 0) -> DGenCTR:
    torch.manual_seed(seed)
    return DGenCTR([20, 30, 12], DGenCTRConfig(d_model=16, layers=1, heads=2))


def _one_pretrain_step(model: DGenCTR) -> None:
    obj = PretrainObjective(model, PretrainConfig(num_negatives=8), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(3, 12, (32, 3))
    labels = (torch.rand(32) < 0.3).float()
    loss, stats = obj(tokens, labels)
    assert torch.isfinite(loss) and stats["masked"].sum() > 0
    loss.backward()
    opt.step()


def test_full_transfer_copies_every_tensor():
    pre = _tiny(0)
    _one_pretrain_step(pre)
    state = {k: v.clone() for k, v in pre.state_dict().items()}
    fine = _tiny(1)
    copied = transfer(state, fine, "all")
    assert sorted(copied) == sorted(fine.state_dict())
    for k, v in fine.state_dict().items():
        assert torch.equal(v, state[k]), k
    tokens = torch.randint(3, 12, (5, 3))
    pre.eval(), fine.eval()
    assert torch.equal(pre(tokens), fine(tokens))


def _pretrained_and_fresh() -> tuple[DGenCTR, DGenCTR, dict[str, torch.Tensor]]:
    """A network after one stage-1 step, a fresh one, and the fresh one's state before transfer."""
    pre = _tiny(0)
    _one_pretrain_step(pre)
    fine = _tiny(1)
    return pre, fine, {k: v.clone() for k, v in fine.state_dict().items()}


def test_embedding_only_transfer_leaves_the_rest():
    pre, fine, before = _pretrained_and_fresh()
    copied = transfer(pre.state_dict(), fine, "embedding")
    assert copied == ["embedding.table.weight"]
    assert torch.equal(fine.embedding.table.weight, pre.embedding.table.weight)
    for k, v in fine.state_dict().items():
        if not k.startswith("embedding."):
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="transfer mode"):
        transfer(pre.state_dict(), fine, "heads")


def test_body_transfer_starts_the_label_head_fresh():
    pre, fine, before = _pretrained_and_fresh()
    copied = transfer(pre.state_dict(), fine, "body")
    head = {k for k in fine.state_dict() if k.startswith("label_head.")}
    assert head and set(copied) == set(fine.state_dict()) - head
    for k, v in fine.state_dict().items():
        assert torch.equal(v, before[k] if k in head else pre.state_dict()[k]), k
    other = DGenCTR([20, 30, 12], DGenCTRConfig(d_model=16, layers=2, heads=2))  # one block more
    with pytest.raises(ValueError, match="does not match"):
        transfer(other.state_dict(), fine, "body")


def test_field_masked_fine_tuning_reads_the_click_through_stage_ones_mask_embeddings():
    model = DGenCTR([20, 30, 12], DGenCTRConfig(d_model=16, layers=1, heads=2))
    tokens = torch.randint(3, 12, (4096, 3))
    labels = (torch.rand(4096) < 0.3).float()
    loss, stats = FineTuneObjective(model, PretrainConfig(), seed=5, field_mask_rate=0.25)(tokens, labels)

    # The same seeded draw: fields masked at the rate, the label always, read through hidden().
    mask = torch.rand(4096, 4, generator=torch.Generator().manual_seed(5)) < 0.25
    assert abs(mask[:, :3].float().mean().item() - 0.25) < 0.01
    mask[:, -1] = True
    expected = F.binary_cross_entropy_with_logits(model.label_logit(model.hidden(tokens, None, mask)), labels)
    assert torch.isclose(loss, expected) and stats == {}
    assert not torch.isclose(loss, F.binary_cross_entropy_with_logits(model(tokens), labels))

    plain, _ = FineTuneObjective(model, PretrainConfig(), seed=5)(tokens, labels)  # rate 0: the scoring view itself
    assert torch.equal(plain, F.binary_cross_entropy_with_logits(model(tokens), labels))


def test_joint_objective_adds_field_reconstruction_but_keeps_the_label_head_on_the_scoring_view():
    model = DGenCTR([20, 30, 12], DGenCTRConfig(d_model=16, layers=1, heads=2, head_hidden=[8], head_batch_norm=True))
    tokens = torch.randint(3, 12, (32, 3))
    labels = (torch.rand(32) < 0.3).float()
    bn = next(m for m in model.label_head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    head = list(model.label_head.parameters())

    loss, stats = FineTuneObjective(model, PretrainConfig(num_negatives=8), seed=0, aux_weight=0.5, aux_rows=16)(tokens, labels)
    assert torch.isclose(loss, stats["bce"] + 0.5 * stats["aux"]) and stats["aux"] > 0
    assert bn.num_batches_tracked.item() == 1  # the head ran on the scoring view only
    joint_grads = torch.autograd.grad(loss, [*head, model.gen_w], allow_unused=True)

    # The label head's gradient is the click loss's alone; the generators learn from the auxiliary term.
    bce = F.binary_cross_entropy_with_logits(model(tokens), labels)
    bce_grads = torch.autograd.grad(bce, head)
    assert all(torch.allclose(j, b, atol=1e-6) for j, b in zip(joint_grads, bce_grads))
    assert joint_grads[-1] is not None and joint_grads[-1].abs().sum() > 0


def test_learned_field_weighting_is_kendalls_uncertainty_loss_over_masked_elements():
    """Why: with `field_weighting: learned` each field k and the label must add exp(-s_k) L_k + s_k
    per masked element (averaged over masked elements as before), and s_k must be trainable by an
    optimiser that only sees `model.parameters()` (the pipeline's stage 1)."""
    from model.diffusion import LOG_VARIANCE, learned_log_variance

    tokens = torch.randint(3, 12, (64, 3))
    labels = (torch.rand(64) < 0.3).float()
    plain_model = _tiny(0)
    plain, _ = PretrainObjective(plain_model, PretrainConfig(num_negatives=8), seed=4)(tokens, labels)
    assert learned_log_variance(plain_model) is None  # off by default: nothing new on the network

    model = _tiny(0)
    obj = PretrainObjective(model, PretrainConfig(num_negatives=8, field_weighting="learned"), seed=4)
    s = learned_log_variance(model)
    assert s is not None and s.shape == (4,) and any(p is s for p in model.parameters())
    at_zero, _ = obj(tokens, labels)  # s = 0: weights 1, the unweighted loss
    assert torch.isclose(at_zero, plain, atol=1e-5)

    with torch.no_grad():
        s.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3]))
    obj.generator.manual_seed(4)  # replay the same mask
    loss, _ = obj(tokens, labels)
    mask = sample_mask(64, 3, "linear", True, torch.Generator().manual_seed(4))
    h = model.hidden(tokens, labels, mask)
    gen, cand = F.normalize(model.generate(h), dim=-1), F.normalize(model.embedding(tokens), dim=-1)
    terms = []
    for k in range(3):  # each field's masked elements by hand: sampled softmax over the first 8 rows
        for b in mask[:, k].nonzero().flatten().tolist():
            neg = [c for c in range(8) if tokens[c, k] != tokens[b, k]]
            logits = torch.stack([gen[b, k] @ cand[b, k]] + [gen[b, k] @ cand[c, k] for c in neg]) / 0.1
            terms.append(math.exp(-s[k].item()) * (torch.logsumexp(logits, 0) - logits[0]) + s[k].item())
    ce = F.binary_cross_entropy_with_logits(model.label_logit(h), labels, reduction="none")
    terms += [math.exp(-s[3].item()) * ce[b] + s[3].item() for b in mask[:, 3].nonzero().flatten().tolist()]
    assert torch.isclose(loss, torch.stack(terms).mean(), atol=1e-4)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad.abs().gt(0).all()

    # Stage 1 only: transfer leaves s behind, so the scorer (and its export) never carries it.
    fine = _tiny(1)
    copied = transfer(model.state_dict(), fine, "all")
    assert LOG_VARIANCE in model.state_dict() and LOG_VARIANCE not in copied and LOG_VARIANCE not in fine.state_dict()
    assert LOG_VARIANCE not in transfer(model.state_dict(), _tiny(1), "body")
    with pytest.raises(ValueError, match="field_weighting"):
        PretrainObjective(_tiny(0), PretrainConfig(field_weighting="fixed"), seed=0)


def test_learned_field_weights_train_in_stage_one_and_are_logged(tmp_path, synth_dir, caplog):
    """Why: the options must reach a real run: both in the resolved config.json, s_k moved by
    stage 1 and reported at its end (log and metrics.json), absent from the scorer's weights."""
    import json
    import logging

    from safetensors.torch import load_file

    from ctr.cli import main
    from model.diffusion import LOG_VARIANCE

    out = tmp_path / "run"
    argv = ["train", "--config", "synthetic/dgenctr", "--data", str(synth_dir), "--out", str(out), "--seed", "2",
            "--threads", "1", "--no-progress", "--max-rows", "2000", "--set", "train.max_steps_per_epoch=3",
            "--set", "train.epochs=1", "--set", "pretrain.epochs=1", "--set", "model={d_model: 16, layers: 1, heads: 2}",
            "--set", "train.batch_size=256", "--set", "pretrain.batch_size=256", "--set", "pretrain.num_negatives=64",
            "--set", "model.readout=concat_embed", "--set", "pretrain.field_weighting=learned", "--set", "pretrain_mode=full"]
    with caplog.at_level(logging.INFO, logger="model.diffusion"):
        assert main(argv) == 0
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["model"]["readout"] == "concat_embed" and run["pretrain"]["field_weighting"] == "learned"
    report = json.loads((out / "metrics.json").read_text())["pretrain"]["valid_reconstruction"]
    weights = [r["weight"] for r in report.values()]
    assert weights and all(w > 0 for w in weights) and any(abs(w - 1) > 1e-4 for w in weights)
    assert sum("stage1_field_weight" in r.getMessage() for r in caplog.records) == len(load_file(out / "pretrained.safetensors")[LOG_VARIANCE])
    assert LOG_VARIANCE not in load_file(out / "model.safetensors")


def test_learned_init_starts_each_log_variance_at_its_first_batch_loss():
    """Why: with `learned_init` every s_k must start at log of its kind's mean masked loss on the
    first batch (each weighted term then starts at 1), and only once."""
    from model.diffusion import learned_log_variance

    tokens = torch.randint(3, 12, (256, 3))
    labels = (torch.rand(256) < 0.3).float()
    model = _tiny(0)
    obj = PretrainObjective(model, PretrainConfig(num_negatives=8, field_weighting="learned_init"), seed=4)
    s = learned_log_variance(model)
    loss, _ = obj(tokens, labels)
    mask = sample_mask(256, 3, "linear", True, torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = model.hidden(tokens, labels, mask)
        feat, _, masked = sampled_softmax_loss(model.generate(h), model.embedding(tokens), tokens, mask[:, :3], 0.1, 8, per_field=True)
        ce = F.binary_cross_entropy_with_logits(model.label_logit(h), labels, reduction="none")[mask[:, 3]].mean()
    want = torch.log(torch.cat([feat / masked, ce.view(1)]))
    assert torch.allclose(s.detach(), want, atol=1e-5) and not torch.allclose(s.detach(), torch.zeros(4))
    # Every term exp(-s_k) L_k sums to one per masked element: the loss is 1 + mean s over masked elements.
    counts = torch.cat([masked, mask[:, 3].sum().view(1).float()])
    assert torch.isclose(loss, 1 + (want * counts).sum() / counts.sum(), atol=1e-4)
    before = s.detach().clone()
    obj(tokens, labels)
    assert torch.equal(s.detach(), before)  # no second initialisation
