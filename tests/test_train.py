"""fastddpm.train: exact resume, non-finite losses, checkpoints of a trained run (architecture checks,
export), DDP (gloo). The checkpoint files themselves: tests/test_checkpoint.py."""
import json
import os

import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.train import NonFiniteLossError, TrainConfig, train
from ddp_helpers import as_rank, free_port

TINY = dict(dataset="digits", base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), num_res_blocks=1,
            groups=4, num_timesteps=100, batch_size=8, lr=1e-3, warmup_steps=4, log_every=1, progress=False,
            ema_decay=0.9, compile=False)


def _cfg(out_dir, **kw):
    d = dict(TINY)
    d.update(kw)
    return TrainConfig(out_dir=str(out_dir), **d)


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


class _Faults:
    """Patch GaussianDiffusion.training_losses: raise on some calls, make the loss NaN on others."""

    def __init__(self, monkeypatch, crash_at=(), nan_at=()):
        self.calls = 0
        orig = GaussianDiffusion.training_losses
        faults = self

        def patched(self_, *a, **k):
            faults.calls += 1
            if faults.calls in crash_at:
                raise RuntimeError("simulated crash")
            out = orig(self_, *a, **k)
            if faults.calls in nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)


def _state(run_dir):
    ck = ckpt.load_checkpoint(run_dir, load_state=True)
    return ck


@pytest.mark.slow  # three end-to-end training runs
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    # dropout, flips and label dropout on, so every RNG stream matters
    kw = dict(steps=16, save_every=5, keep=2, dropout=0.1, random_flip=True, class_cond=True, p_uncond=0.25)
    a = train(_cfg(tmp_path / "a", **kw))
    assert a.step == 16 and len(a.losses) == 16 and a.skipped == 0

    faults = _Faults(monkeypatch, crash_at=(13,))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(tmp_path / "b", **kw))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [5, 10]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_cfg(tmp_path / "b", **kw))
    faults.calls = -100  # no more faults
    b = train(_cfg(tmp_path / "b", resume=True, **kw))
    assert b.step == 16 and len(b.losses) == 6
    assert b.losses == a.losses[10:]  # bit-for-bit
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, 17))  # the crashed run's lines 11, 12 were dropped
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]

    ca, cb = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert ca.step == cb.step == 16
    for name in ("model", "ema"):
        sa, sb = getattr(ca, name), getattr(cb, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    oa, ob = ca.state["optimizer"]["state"], cb.state["optimizer"]["state"]
    for i in oa:
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])
    # keep=2: only the last two checkpoints remain; config JSON is complete
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "a")] == [15, 16]
    assert ca.config["model"]["num_classes"] == 10 and ca.config["train"]["steps"] == 16
    # the EMA is an actual average: it differs from the raw weights
    assert any(not torch.equal(ca.model[k], ca.ema[k]) for k in ca.model)


def test_nonfinite_loss_skips_step(tmp_path, monkeypatch):
    _Faults(monkeypatch, nan_at=(3, 4))
    r = train(_cfg(tmp_path, steps=5, save_every=1, keep=0))
    assert r.skipped == 2
    assert [torch.isnan(torch.tensor(v)).item() for v in r.losses] == [False, False, True, True, False]
    cks = dict(ckpt.list_checkpoints(tmp_path))
    w = {s: ckpt.load_checkpoint(cks[s], load_state=True) for s in (2, 3, 4, 5)}
    for k in w[2].model:  # skipped steps leave weights, EMA and optimizer untouched
        assert torch.equal(w[2].model[k], w[4].model[k]) and torch.equal(w[2].ema[k], w[4].ema[k])
    assert any(not torch.equal(w[4].model[k], w[5].model[k]) for k in w[4].model)
    assert w[4].state["updates"] == 2 and w[4].state["skipped"] == 2 and w[5].state["updates"] == 3
    assert _log(tmp_path)[-1]["skipped"] == 2


def test_nonfinite_loss_k_in_a_row_stops(tmp_path, monkeypatch):
    _Faults(monkeypatch, nan_at=set(range(2, 100)))
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 consecutive steps \(steps 2\.\.4\)"):
        train(_cfg(tmp_path, steps=10, max_nonfinite=3, save_every=0))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="schedule must be one of"):
        train(_cfg(tmp_path, schedule="quadratic"))
    with pytest.raises(ValueError, match="learn_sigma"):
        train(_cfg(tmp_path, learn_sigma=True))
    with pytest.raises(ValueError, match="batch_size 4096 is larger than the dataset"):
        train(_cfg(tmp_path, batch_size=4096))
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        train({"dataset": "digits", "stepz": 3})


# ------------------------------------------------------------------------------ checkpoints of a trained run
def test_architecture_mismatch(tmp_path):
    r = train(_cfg(tmp_path, steps=1, save_every=0))
    model, diff, cfg = build.load_model(r.checkpoint)
    assert cfg["model"]["base_channels"] == 8 and diff.num_timesteps == 100
    ck = ckpt.load_checkpoint(r.checkpoint, load_state=False)
    cfg = dict(ck.config)
    cfg["model"] = dict(cfg["model"], base_channels=16)
    other = build.build_model(cfg)
    with pytest.raises(ckpt.CheckpointError, match=r"do not match the model architecture.*shape mismatches"):
        ckpt.check_state_dict(other, ck.ema, ck.path)
    # a keyword this UNet version does not know is ignored; the weights decide whether it matters
    cfg["model"] = dict(ck.config["model"], option_from_a_newer_version=True)
    ckpt.check_state_dict(build.build_model(cfg), ck.ema, ck.path)
    cfg["model"] = dict(ck.config["model"], num_res_blocks=2)
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys"):
        ckpt.check_state_dict(build.build_model(cfg), ck.ema, ck.path)
    # resuming with another architecture is refused
    with pytest.raises(ValueError, match="config differs"):
        train(_cfg(tmp_path, steps=2, base_channels=16, resume=True))
    # a checkpoint whose config lies about the architecture fails to load with that message
    cp = os.path.join(r.checkpoint, "config.json")
    j = json.load(open(cp))
    j["model"]["base_channels"] = 16
    json.dump(j, open(cp, "w"))
    with pytest.raises(ckpt.CheckpointError, match="do not match the model architecture"):
        build.load_model(r.checkpoint)


# ------------------------------------------------------------------------------ DDP (2 CPU processes, gloo)
def _ddp_worker(rank, world, port, out_dir, result_dir):
    as_rank(rank, world, port)
    from fastddpm.unet import UNet  # noqa: F401  (import before the process group, as torchrun would)

    r = train(_cfg(out_dir, steps=4, save_every=0, batch_size=8, dropout=0.1))
    torch.save({"losses": r.losses, "ckpt": r.checkpoint, "model": r.model.state_dict(), "ema": r.ema.state_dict()},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two training processes
def test_ddp_two_processes_gloo(tmp_path):
    import torch._dynamo  # noqa: F401  (imported once here, inherited by the forked workers)
    import torch.multiprocessing as mp

    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    # fork: the children inherit the imported modules (spawning re-imports torch._dynamo: ~10 s each)
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(out), str(res)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(res / f"rank{i}.pt") for i in (0, 1))
    assert r0["ckpt"] and r0["ckpt"].endswith("step_00000004")
    assert r0["losses"] != r1["losses"]  # each rank saw its own shard and noise
    ck = ckpt.load_checkpoint(out)
    assert ck.state["world_size"] == 2 and len(ck.state["rng"]) == 2
    # the logged loss is the mean over both ranks of each step's loss (log_every=1)
    logged = [rec["loss"] for rec in _log(out)]
    expect = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert logged == pytest.approx(expect, rel=1e-6)
    # different data on each rank, yet identical weights: the gradients were averaged across ranks
    for name in ("model", "ema"):
        for k, v in r0[name].items():
            assert torch.equal(v, r1[name][k]), (name, k)
            assert torch.equal(v, getattr(ck, name)[k]), (name, k)
    assert any(not torch.equal(r0["model"][k], r0["ema"][k]) for k in r0["model"])


def test_export_model_single_file(tmp_path):
    r = train(_cfg(tmp_path / "run", steps=2, save_every=0))
    out = str(tmp_path / "m.safetensors")
    build.export_model(str(tmp_path / "run"), out)
    os.remove(str(tmp_path / "m.json"))  # the config in the file's metadata is enough
    model, diff, cfg = build.load_model(out)
    assert cfg["weights"] == "ema" and cfg["exported_from"]["step"] == 2 and diff.num_timesteps == 100
    for k, v in r.ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="must end with .safetensors"):
        build.export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"))
