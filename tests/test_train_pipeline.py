"""`ctr train` end to end on small synthetic data: quality, run directory, schema, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ctr.cli import main

SMALL_DGENCTR = ["--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "256", "--pretrain-batch-size", "256",
                 "--num-negatives", "64", "--no-progress", "--threads", "1"]
TINY = ["--max-rows", "2000", "--max-steps-per-epoch", "4"]


def _train(tmp: Path, data: Path, model: str, *extra: str) -> dict:
    # One thread: on a shared 2-core machine, two OpenMP threads per step thrash on tiny tensors.
    extra = (*extra, "--threads", "1") if "--threads" not in extra else extra
    out = tmp / model
    assert main(["train", "--spec", "synthetic", "--data", str(data), "--model", model, "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_dgenctr_few_hundred_steps_beats_a_constant_predictor(tmp_path, synth_dir):
    # 2 pre-training + up to 5 fine-tuning epochs of 40 steps (batch 256): a few hundred steps.
    metrics = _train(tmp_path, synth_dir, "dgenctr", *SMALL_DGENCTR, "--pretrain-epochs", "2", "--epochs", "5",
                     "--max-steps-per-epoch", "40", "--lr", "3e-3")
    bayes = json.loads((synth_dir / "meta.json").read_text())["bayes_auc"]["test"]
    # A constant predictor has AUC 0.5; the generator's Bayes-optimal AUC is the ceiling.
    assert metrics["test"]["auc"] > 0.62, metrics["test"]
    assert metrics["test"]["auc"] < bayes + 0.02
    assert 0.5 < metrics["test"]["calibration"] < 2.0
    run = tmp_path / "dgenctr"
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "feature_spec.json", "config.json", "metrics.json"}
    # Per-field reconstruction accuracy is recorded for the user to inspect.
    recon = metrics["pretrain"]["valid_reconstruction"]
    assert "item_id" in recon and "label" in recon and 0.0 <= recon["item_id"]["accuracy"] <= 1.0
    assert metrics["pretrain"]["transferred_tensors"] > 10


def test_metrics_json_schema_and_run_roundtrip(tmp_path, synth_dir):
    from model.run_io import load_run
    from model.trainer import predict

    metrics = _train(tmp_path, synth_dir, "dnn", "--epochs", "2", "--batch-size", "512", "--hidden", "64,64", "--no-progress")
    on_disk = json.loads((tmp_path / "dnn" / "metrics.json").read_text())
    assert on_disk["model"] == "dnn"
    for split in ("valid", "test"):
        assert set(on_disk[split]) == {"auc", "logloss", "gauc", "calibration"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in on_disk[split].values())
    assert isinstance(on_disk["train_seconds"], float) and on_disk["train_seconds"] > 0
    config = json.loads((tmp_path / "dnn" / "config.json").read_text())
    assert config["model_type"] == "dnn" and set(config) >= {"model", "train", "data"}

    run = load_run(tmp_path / "dnn")
    assert not run.model.training and run.spec.fitted and run.config["model_type"] == "dnn"
    test = pd.read_parquet(synth_dir / "test.parquet")
    import torch
    from model.metrics import auc

    probs = predict(run.model, torch.from_numpy(run.spec.encode(test)))
    assert auc(test["label"].to_numpy(), probs) == pytest.approx(metrics["test"]["auc"], abs=1e-6)


@pytest.mark.parametrize("model", ["deepfm", "dcnv2"])
def test_baselines_train_in_the_same_harness(tmp_path, synth_dir, model):
    metrics = _train(tmp_path, synth_dir, model, "--epochs", "3", "--batch-size", "256", "--lr", "3e-3", "--no-progress",
                     "--max-rows", "6000", "--hidden", "64,64")
    assert metrics["model"] == model and metrics["valid"]["auc"] > 0.55


def test_runs_are_reproducible_on_cpu(tmp_path, synth_dir):
    args = ["--epochs", "1", "--batch-size", "512", "--no-progress", "--max-rows", "5000", "--seed", "3", "--hidden", "64,64"]
    a = _train(tmp_path / "a", synth_dir, "dnn", *args)
    b = _train(tmp_path / "b", synth_dir, "dnn", *args)
    assert a["test"] == b["test"]
    c = _train(tmp_path / "c", synth_dir, "dgenctr", *SMALL_DGENCTR, "--pretrain-epochs", "1", "--epochs", "1", *TINY, "--seed", "3")
    d = _train(tmp_path / "d", synth_dir, "dgenctr", *SMALL_DGENCTR, "--pretrain-epochs", "1", "--epochs", "1", *TINY, "--seed", "3")
    assert c["test"] == d["test"]


def test_reused_pretrained_checkpoint_and_ablation_modes(tmp_path, synth_dir):
    base = [*TINY, "--epochs", "1", "--pretrain-epochs", "1", *SMALL_DGENCTR]
    first = _train(tmp_path / "full", synth_dir, "dgenctr", *base)
    ckpt = tmp_path / "full" / "dgenctr" / "pretrained.safetensors"
    assert ckpt.exists()
    again = _train(tmp_path / "reuse", synth_dir, "dgenctr", *base, "--pretrained", str(ckpt))
    assert again["test"] == first["test"]  # same stage-1 weights, same stage 2
    emb = _train(tmp_path / "emb", synth_dir, "dgenctr", *base, "--pretrained", str(ckpt), "--pretrain-mode", "embedding")
    assert emb["variant"] == "dgenctr-emb-only" and emb["pretrain"]["transferred_tensors"] == 1
    scratch = _train(tmp_path / "scratch", synth_dir, "dgenctr", *base, "--pretrain-mode", "none")
    assert scratch["variant"] == "dgenctr-scratch" and "pretrain" not in scratch
    nolabel = _train(tmp_path / "nolabel", synth_dir, "dgenctr", *base, "--no-label-mask")
    assert nolabel["variant"] == "dgenctr-no-label"
    assert nolabel["pretrain"]["valid_reconstruction"]["label"]["masked"] > 0  # the report masks it anyway


def test_transferred_tensors_train_at_their_own_lr(tmp_path, synth_dir):
    from safetensors.torch import load_file

    base = [*TINY, "--epochs", "1", "--pretrain-epochs", "1", *SMALL_DGENCTR]
    first = _train(tmp_path / "pre", synth_dir, "dgenctr", *base)
    ckpt = tmp_path / "pre" / "dgenctr" / "pretrained.safetensors"
    # Scale 0 freezes the transferred encoder; the fresh label head and the embedding table learn.
    frozen = _train(tmp_path / "frozen", synth_dir, "dgenctr", *base, "--pretrained", str(ckpt), "--pretrain-mode", "body",
                    "--transfer-lr-scale", "0")
    assert frozen["variant"] == "dgenctr-new-head"
    pre, fine = load_file(ckpt), load_file(tmp_path / "frozen" / "dgenctr" / "model.safetensors")
    network = [k for k in pre if not k.startswith(("label_head.", "embedding."))]
    assert network and all(torch.equal(pre[k], fine[k]) for k in network)
    assert not torch.equal(pre["embedding.table.weight"], fine["embedding.table.weight"])  # the table keeps the full LR
    assert any(not torch.equal(pre[k], fine[k]) for k in pre if k.startswith("label_head."))
    config = json.loads((tmp_path / "frozen" / "dgenctr" / "config.json").read_text())
    assert config["train"]["transfer_lr_scale"] == 0.0 and config["train"]["pretrain_mode"] == "body"
    assert frozen["test"] != first["test"]


def test_shrink_toward_blends_float_tensors_and_keeps_integer_buffers():
    from model.transfer import shrink_toward

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    pre = {k: (v + 4.0 if v.is_floating_point() else v + 7) for k, v in fresh.items()}
    net.load_state_dict(pre)
    shrink_toward(net, fresh, sorted(pre), 0.25)
    after = net.state_dict()
    assert torch.allclose(after["0.weight"], 0.25 * pre["0.weight"] + 0.75 * fresh["0.weight"])
    assert torch.allclose(after["1.running_var"], 0.25 * pre["1.running_var"] + 0.75 * fresh["1.running_var"])
    assert torch.equal(after["1.num_batches_tracked"], pre["1.num_batches_tracked"])
    with pytest.raises(ValueError, match="transfer keep"):
        shrink_toward(net, fresh, sorted(pre), 1.5)


def test_transfer_keep_spans_the_plain_transfer_and_the_from_scratch_network(tmp_path, synth_dir):
    base = [*TINY, "--epochs", "1", "--pretrain-epochs", "1", *SMALL_DGENCTR]
    full = _train(tmp_path / "pre", synth_dir, "dgenctr", *base)
    ckpt = str(tmp_path / "pre" / "dgenctr" / "pretrained.safetensors")
    scratch = _train(tmp_path / "scratch", synth_dir, "dgenctr", *base, "--pretrain-mode", "none")
    # Stage 2 builds its network with the seed the from-scratch run uses, so keeping nothing
    # of stage 1 is that run, and keeping all of it is the plain transfer.
    none_kept = _train(tmp_path / "k0", synth_dir, "dgenctr", *base, "--pretrained", ckpt, "--transfer-keep", "0")
    assert none_kept["variant"] == "dgenctr-shrink"
    assert none_kept["test"] == scratch["test"] and none_kept["test"] != full["test"]
    all_kept = _train(tmp_path / "k1", synth_dir, "dgenctr", *base, "--pretrained", ckpt, "--transfer-keep", "1")
    assert all_kept["variant"] == "dgenctr" and all_kept["test"] == full["test"]
    half = _train(tmp_path / "k05", synth_dir, "dgenctr", *base, "--pretrained", ckpt, "--transfer-keep", "0.5")
    assert half["test"] not in (scratch["test"], full["test"])
    config = json.loads((tmp_path / "k05" / "dgenctr" / "config.json").read_text())
    assert config["train"]["transfer_keep"] == 0.5


def test_embedding_l2_can_anchor_at_the_pretrained_table(tmp_path, synth_dir):
    from safetensors.torch import load_file

    base = [*TINY, "--epochs", "2", "--pretrain-epochs", "1", *SMALL_DGENCTR, "--embedding-l2", "10"]
    _train(tmp_path / "pre", synth_dir, "dgenctr", *base)
    ckpt = tmp_path / "pre" / "dgenctr" / "pretrained.safetensors"
    key = "embedding.table.weight"
    start = load_file(ckpt)[key]
    drift = {}
    for anchor in ("zero", "pretrained"):
        _train(tmp_path / anchor, synth_dir, "dgenctr", *base, "--pretrained", str(ckpt), "--embedding-l2-anchor", anchor)
        table = load_file(tmp_path / anchor / "dgenctr" / "model.safetensors")[key]
        drift[anchor] = ((table - start).abs().mean() / start.abs().mean()).item()
    # Towards zero, a strong penalty shrinks the whole transferred table; anchored, it holds it.
    assert drift["pretrained"] < 0.5 * drift["zero"], drift


def test_regularised_stage_two_logs_its_losses_and_records_its_settings(tmp_path, synth_dir):
    # No embedding L2 (the synthetic recipe's 0.005 would add its penalty to the logged loss).
    base = [*TINY, "--epochs", "2", "--pretrain-epochs", "1", *SMALL_DGENCTR, "--embedding-l2", "0"]
    plain = _train(tmp_path / "plain", synth_dir, "dgenctr", *base, "--pretrain-mode", "none")
    joint = _train(tmp_path / "joint", synth_dir, "dgenctr", *base, "--pretrain-mode", "none", "--aux-weight", "0.3",
                   "--aux-rows", "64")
    assert joint["variant"] == "dgenctr-scratch-aux"
    history = joint["history"]
    for row in history:
        assert row["train_loss"] == pytest.approx(row["train_bce"] + 0.3 * row["train_aux"], rel=1e-4)
    assert history[1]["train_aux"] < history[0]["train_aux"]  # the reconstruction is learned, not just computed
    assert "train_aux" not in plain["history"][0]
    assert joint["test"] != plain["test"]
    config = json.loads((tmp_path / "joint" / "dgenctr" / "config.json").read_text())
    assert config["train"]["aux_weight"] == 0.3 and config["train"]["aux_rows"] == 64

    masked = _train(tmp_path / "fmask", synth_dir, "dgenctr", *base, "--pretrain-mode", "none", "--field-mask-rate", "0.2")
    assert masked["variant"] == "dgenctr-scratch-fmask" and masked["test"] != plain["test"]
    config = json.loads((tmp_path / "fmask" / "dgenctr" / "config.json").read_text())
    assert config["train"]["field_mask_rate"] == 0.2


def test_baselines_take_the_field_mask_too(tmp_path, synth_dir):
    base = [*TINY, "--epochs", "2", "--batch-size", "256", "--hidden", "32,32", "--no-progress"]
    plain = _train(tmp_path / "plain", synth_dir, "dnn", *base)
    masked = _train(tmp_path / "fmask", synth_dir, "dnn", *base, "--field-mask-rate", "0.2")
    assert masked["variant"] == "dnn-fmask" and masked["test"] != plain["test"]
    config = json.loads((tmp_path / "fmask" / "dnn" / "config.json").read_text())
    assert config["train"]["field_mask_rate"] == 0.2


def test_fixed_lr_schedule_decays_at_its_epochs_and_holds_off_early_stopping(tmp_path, synth_dir):
    base = [*TINY, "--batch-size", "256", "--hidden", "32,32", "--no-progress", "--patience", "1"]
    fixed = _train(tmp_path / "fixed", synth_dir, "dnn", *base, "--epochs", "4", "--lr-decay-epochs", "1,3")
    assert [row["lr"] for row in fixed["history"]] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    config = json.loads((tmp_path / "fixed" / "dnn" / "config.json").read_text())
    assert config["train"]["lr_decay_epochs"] == [1, 3]

    # At LR 0.1 some epochs bring no gain, so the plateau decay fires; --lr-decay 1 keeps the LR.
    six = [*base, "--epochs", "6", "--patience", "9", "--lr", "0.1"]
    plateau = _train(tmp_path / "p", synth_dir, "dnn", *six)
    constant = _train(tmp_path / "c", synth_dir, "dnn", *six, "--lr-decay", "1")
    assert min(row["lr"] for row in plateau["history"]) < 0.1
    assert [row["lr"] for row in constant["history"]] == [0.1] * 6

    # With a zero LR no epoch improves on the first: the plateau run stops after `patience`
    # more epochs, the fixed one only after `patience` epochs past its last decay.
    # (No BatchNorm: its running statistics would still move.)
    frozen = [*base, "--epochs", "8", "--lr", "0", "--model-opt", "batch_norm=false"]
    plateau = _train(tmp_path / "p0", synth_dir, "dnn", *frozen)
    held = _train(tmp_path / "f0", synth_dir, "dnn", *frozen, "--lr-decay-epochs", "4")
    assert len(plateau["history"]) == 2 and len(held["history"]) == 5


def test_weight_average_is_the_ema_of_weights_and_buffers():
    from model.trainer import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert WeightAverage(net, 0.0).scored is net
    avg = WeightAverage(net, 0.9)
    w0 = net[0].weight.detach().clone()
    avg.update()  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
    avg.update()
    assert avg.scored is not net
    assert torch.allclose(avg.scored[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.allclose(avg.scored[1].running_mean, torch.full((2,), 0.2))  # 0.9 * 0 + 0.1 * 2
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(net, 1.0)


def test_ema_epochs_is_a_horizon_that_carries_across_batch_sizes():
    from model.trainer import DistContext, TrainConfig, ema_decay_per_step, steps_per_epoch

    rows = 202_027  # Frappe_x1's train split
    decays = {}
    for batch in (1024, 4096):
        cfg = TrainConfig(batch_size=batch, ema_epochs=1.0)
        steps = steps_per_epoch(rows, cfg, DistContext())
        assert steps == rows // batch  # full batches only
        decays[batch] = ema_decay_per_step(cfg, steps)
        assert 1 / (1 - decays[batch]) == pytest.approx(steps)
    # The two documented per-step decays are both about one epoch on this split.
    assert decays[1024] == pytest.approx(0.995, abs=1e-4) and decays[4096] == pytest.approx(0.98, abs=1e-3)
    # Under DDP each rank takes its share of every global batch, so the steps (and the decay)
    # of an epoch stay those of one process.
    assert steps_per_epoch(rows, TrainConfig(batch_size=1024), DistContext(rank=1, world=2)) == rows // 1024
    assert ema_decay_per_step(TrainConfig(ema_decay=0.9), 100) == 0.9  # a per-step decay passes through
    assert ema_decay_per_step(TrainConfig(ema_epochs=0.001), 100) == 0.0  # under one step: no averaging


def test_ema_run_scores_and_keeps_the_averaged_weights(tmp_path, synth_dir):
    from model.metrics import auc
    from model.run_io import load_run
    from model.trainer import predict

    # A fixed LR schedule: a plateau decay would follow the averaged score and change the path.
    base = [*TINY, "--epochs", "3", "--lr-decay-epochs", "2", "--batch-size", "256", "--hidden", "32,32", "--no-progress",
            "--calibration", "none"]
    plain = _train(tmp_path / "plain", synth_dir, "dnn", *base)
    ema = _train(tmp_path / "ema", synth_dir, "dnn", *base, "--ema-decay", "0.5")
    assert ema["variant"] == "dnn-ema" and plain["variant"] == "dnn"
    # The optimiser's path is the same: the raw weights score as the plain run's did.
    assert [r["valid_auc_raw"] for r in ema["history"]] == pytest.approx([r["valid_auc"] for r in plain["history"]])
    assert "valid_auc_raw" not in plain["history"][0]
    assert [r["valid_auc"] for r in ema["history"]] != [r["valid_auc"] for r in plain["history"]]
    config = json.loads((tmp_path / "ema" / "dnn" / "config.json").read_text())
    assert config["train"]["ema_decay"] == 0.5
    # Half an epoch of 4 capped steps is a 2-step horizon: the per-step decay 0.5 again.
    by_epochs = _train(tmp_path / "ema-epochs", synth_dir, "dnn", *base, "--ema-epochs", "0.5")
    assert by_epochs["variant"] == "dnn-ema"
    assert [r["valid_auc"] for r in by_epochs["history"]] == [r["valid_auc"] for r in ema["history"]]
    # What the run keeps and saves is the average it validated, not the last raw weights.
    best = max(r["valid_auc"] for r in ema["history"])
    assert ema["valid"]["auc"] == pytest.approx(best, abs=1e-9)
    run = load_run(tmp_path / "ema" / "dnn")
    valid = pd.read_parquet(synth_dir / "valid.parquet").head(2000)
    probs = predict(run.model, torch.from_numpy(run.spec.encode(valid)))
    assert auc(valid["label"].to_numpy(), probs) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("value", ["0", "3,2", "2,2", "x"])
def test_lr_decay_epochs_must_be_increasing_positive_epochs(tmp_path, synth_dir, capsys, value):
    argv = ["train", "--spec", "synthetic", "--data", str(synth_dir), "--model", "dnn", "--out", str(tmp_path / "r"),
            "--lr-decay-epochs", value]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "--lr-decay-epochs" in capsys.readouterr().err


def test_param_groups_scale_only_the_named_parameters():
    from model.trainer import param_groups

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    groups = param_groups(net, 1e-3, ["0.weight", "0.bias"], 0.1)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["params"][0] is net[0].weight
    assert len(param_groups(net, 1e-3, ["0.weight"], 1.0)) == 1
    with pytest.raises(ValueError, match="no such parameters"):
        param_groups(net, 1e-3, ["2.weight"], 0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "xgboost"], "unknown model 'xgboost'"),
        (["--model", "dgenctr", "--pretrain-mode", "none", "--transfer-lr-scale", "0.1"], "needs a DGenCTR run that transfers"),
        (["--embedding-l2-anchor", "pretrained"], "needs a DGenCTR run that transfers"),
        (["--model", "dgenctr", "--pretrain-mode", "none", "--transfer-keep", "0.5"], "transfer_keep 0.5 needs a DGenCTR run"),
        (["--model", "dgenctr", "--transfer-keep", "1.5"], "a value in [0, 1]"),
        (["--aux-weight", "0.1"], "needs a DGenCTR run"),
        (["--field-mask-rate", "1"], "must be in [0, 1)"),
        (["--ema-decay", "1"], "ema_decay 1.0 must be in [0, 1)"),
        (["--ema-decay", "0.9", "--ema-epochs", "1"], "one or the other"),
        (["--ema-epochs", "-1"], "ema_epochs -1.0 must be >= 0"),
        (["--lr-decay", "0"], "lr_decay 0.0 must be in (0, 1]"),
        (["--epochs", "5", "--lr-decay", "1", "--lr-decay-epochs", "2"], "needs an lr_decay below 1"),
        (["--epochs", "5", "--lr-decay-epochs", "5"], "must all come before the last epoch"),
        (["--lr-decay-epochs", "3", "--lr-patience", "1"], "no lr_patience"),
        (["--data", "/no/such/dir"], "data directory not found"),
        (["--model-opt", "bogus=1"], "no option"),
        (["--spec", "no_such_spec"], "not found"),
    ],
)
def test_bad_configs_give_one_clear_line(tmp_path, synth_dir, capsys, args, message):
    base = {"--spec": "synthetic", "--data": str(synth_dir), "--model": "dnn", "--out": str(tmp_path / "r")}
    extra = []
    for i in range(0, len(args), 2):
        if args[i] in base:
            base[args[i]] = args[i + 1]
        else:
            extra += args[i : i + 2]
    argv = ["train"] + [x for kv in base.items() for x in kv] + extra + ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_missing_label_column_is_refused(tmp_path, synth_dir, capsys):
    data = tmp_path / "nolabel"
    data.mkdir()
    for split in ("train", "valid", "test"):
        pd.read_parquet(synth_dir / f"{split}.parquet").head(200).drop(columns=["label"]).to_parquet(data / f"{split}.parquet")
    assert main(["train", "--spec", "synthetic", "--data", str(data), "--model", "dnn", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "label column 'label' is not in" in capsys.readouterr().err


def test_missing_split_is_refused(tmp_path, synth_dir, capsys):
    data = tmp_path / "partial"
    data.mkdir()
    pd.read_parquet(synth_dir / "train.parquet").head(200).to_parquet(data / "train.parquet")
    assert main(["train", "--spec", "synthetic", "--data", str(data), "--model", "dnn", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "no 'valid' split" in capsys.readouterr().err


def test_epoch_shards_partition_one_seeded_permutation():
    import torch

    from model.data import epoch_batches

    shards = [torch.cat(epoch_batches(103, 16, seed=4, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51  # equal step counts on every rank
    both = torch.cat(shards)
    assert len(set(both.tolist())) == 102  # disjoint
    again = torch.cat(epoch_batches(103, 16, seed=4, epoch=2, rank=0, world=2))
    assert torch.equal(again, shards[0])
    assert not torch.equal(torch.cat(epoch_batches(103, 16, seed=4, epoch=3)), torch.cat(epoch_batches(103, 16, seed=4, epoch=2)))


def test_streaming_parquet_encodes_like_the_in_memory_path(synth_dir, synth_spec):
    from model.data import stream_batches

    chunks = list(stream_batches(synth_spec, synth_dir / "valid.parquet", 1000))
    assert len(chunks) == 3
    full = synth_spec.encode(pd.read_parquet(synth_dir / "valid.parquet"))
    np.testing.assert_array_equal(np.concatenate([c.tokens.numpy() for c in chunks]), full)


def test_weight_average_copies_integer_buffers_instead_of_averaging_them():
    """FieldEmbedding.offsets is an int64 buffer: averaging it shifted every lookup of the
    averaged model by a row, so each EMA run validated a broken network."""
    from model.networks import build_model
    from model.trainer import WeightAverage

    torch.manual_seed(0)
    net = build_model("dnn", {"batch_norm": True}, [10, 25, 7, 40])
    avg = WeightAverage(net, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        net.train()
        net(torch.stack([torch.randint(0, v, (8,)) for v in [10, 25, 7, 40]], dim=1))
        avg.update()
    ints = {n: b for n, b in net.named_buffers() if not b.is_floating_point()}
    assert "embedding.offsets" in ints or any(n.endswith("offsets") for n in ints)
    averaged = dict(avg.scored.named_buffers())
    for name, buf in ints.items():
        assert torch.equal(averaged[name], buf), name


def test_warm_start_blends_towards_the_fresh_network_it_is_given():
    """model/transfer.py's `warm_start` is what stage 2 starts from: keep 1 is stage 1's tensors,
    keep 0 the fresh initialisation, and integer buffers are always stage 1's."""
    from model.networks import build_model
    from model.transfer import warm_start

    vocab = [10, 25, 7, 40]

    def net(seed):
        torch.manual_seed(seed)
        return build_model("dnn", {"hidden": [8], "batch_norm": True}, vocab)

    pre = {k: (v + 1.0 if v.is_floating_point() else v + 3) for k, v in net(1).state_dict().items()}
    fresh = net(0).state_dict()
    for keep in (0.0, 0.25, 1.0):
        target = net(0)
        copied = warm_start(pre, target, "all", keep)
        assert copied == sorted(pre)
        for name, tensor in target.state_dict().items():
            if tensor.is_floating_point():
                assert torch.allclose(tensor, keep * pre[name] + (1 - keep) * fresh[name]), (keep, name)
            else:
                assert torch.equal(tensor, pre[name]), (keep, name)
