"""The training loop reads the device only at sync points (log / checkpoint / sample steps), and a skipped
(non-finite) step changes nothing: weights, EMA, AdamW state, the EMA warm-up count."""
import copy
import json
import os
import sys
from collections import defaultdict

import pytest
import torch

from fastddpm import checkpoint as ckpt
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.train import NonFiniteLossError, TrainConfig, _load_optimizer_state, train

TINY = dict(dataset="digits", base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), num_res_blocks=1,
            groups=4, num_timesteps=50, batch_size=8, lr=1e-3, warmup_steps=3, progress=False, ema_decay=0.9,
            compile=False, save_every=0)

# Python-level reads of a tensor's value: on CUDA each one waits for the device
_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy")
# Reads that only the CPU path makes (each guarded by `device.type == "cpu"`; tests/gpu checks the CUDA
# path under torch.cuda.set_sync_debug_mode): (the reading function, the function that called it or None)
_CPU_ONLY = {
    (("diffusion.py", "_check_t"), None),  # CUDA: torch._assert_async
    (("unet.py", "_check_timesteps"), None),
    (("guards.py", "check_labels"), ("unet.py", "_embedding")),
    (("group_norm.py", "_reference_forward"), None),  # the fold check of ATen's CPU kernel
}


def _where(frame):
    return (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) if frame is not None else None


def _cfg(out_dir, **kw):
    return TrainConfig(out_dir=str(out_dir), **{**TINY, **kw})


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


class _Steps:
    """Counts training steps (calls of training_losses); makes the loss NaN at the steps in nan_at."""

    def __init__(self, monkeypatch, nan_at=()):
        self.step = 0
        orig = GaussianDiffusion.training_losses
        steps = self

        def patched(self_, *a, **k):
            steps.step += 1
            out = orig(self_, *a, **k)
            if steps.step in nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)


def _count_reads(monkeypatch, steps):
    """{step: [(method, file:line)]} of every host read of a tensor, by the step it happened in."""
    reads = defaultdict(list)
    for name in _READS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self_, *a, __orig=orig, __name=name, **k):
            f = sys._getframe(1)
            where = _where(f)
            if (where, None) not in _CPU_ONLY and (where, _where(f.f_back)) not in _CPU_ONLY:
                reads[steps.step].append((__name, f"{f.f_code.co_filename}:{f.f_lineno}"))
            return __orig(self_, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


@pytest.mark.parametrize("nan_at", [(), (4,)])
def test_no_host_read_between_sync_points(tmp_path, monkeypatch, nan_at):
    # class labels, flips, dropout, EMA warm-up and clipping on: every per-step path runs
    steps = _Steps(monkeypatch, nan_at=nan_at)
    reads = _count_reads(monkeypatch, steps)
    r = train(_cfg(tmp_path, steps=7, log_every=3, class_cond=True, random_flip=True, dropout=0.1))
    monkeypatch.undo()
    assert r.step == 7 and r.skipped == len(nan_at)
    quiet = [s for s in range(1, 8) if s not in (3, 6, 7)]  # log steps 3, 6 and the last
    assert {s: reads[s] for s in quiet if reads[s]} == {}
    assert reads[3] and reads[6]  # the counter does see the log steps' reads


def _ck(run_dir, at):
    return ckpt.load_checkpoint(dict(ckpt.list_checkpoints(run_dir))[at], load_state=True)


def test_skipped_step_changes_nothing(tmp_path, monkeypatch):
    _Steps(monkeypatch, nan_at=(3, 4))
    r = train(_cfg(tmp_path, steps=6, log_every=1, save_every=1, keep=0))
    assert r.skipped == 2 and [e["skipped"] for e in _log(tmp_path)] == [0, 0, 1, 2, 2, 2]
    c = {s: _ck(tmp_path, s) for s in (2, 3, 4, 5)}
    for s in (3, 4):  # weights, EMA, AdamW moments and step counts as after step 2
        for k in c[2].model:
            assert torch.equal(c[s].model[k], c[2].model[k]) and torch.equal(c[s].ema[k], c[2].ema[k]), (s, k)
        for i, st in c[2].state["optimizer"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(c[s].state["optimizer"]["state"][i][key], st[key]), (s, i, key)
        assert c[s].state["updates"] == 2
    assert all(float(st["step"]) == 3 for st in c[5].state["optimizer"]["state"].values())
    assert c[5].state["updates"] == 3 and c[5].state["skipped"] == 2
    assert any(not torch.equal(c[5].model[k], c[4].model[k]) for k in c[4].model)
    # step 5 is the 3rd update: EMA decay min(0.9, (1 + 3) / (10 + 3)), the skipped steps not counted
    w = 1 - 4 / 13
    for k in c[4].ema:
        e4, p5 = c[4].ema[k].double(), c[5].model[k].double()
        torch.testing.assert_close(c[5].ema[k].double(), e4 + w * (p5 - e4), rtol=0, atol=1e-6)


def test_skipped_steps_counted_at_log_intervals(tmp_path, monkeypatch, capsys):
    _Steps(monkeypatch, nan_at=(2, 3, 5, 6))  # never 3 in a row
    r = train(_cfg(tmp_path, steps=8, log_every=4, max_nonfinite=3))
    assert r.skipped == 4 and [(e["step"], e["skipped"]) for e in _log(tmp_path)] == [(4, 2), (8, 4)]
    assert [v != v for v in r.losses] == [False, True, True, False, True, True, False, False]
    err = capsys.readouterr().err
    for s, row, total in ((2, 1, 1), (3, 2, 2), (5, 1, 3), (6, 2, 4)):
        assert f"step {s}: non-finite loss (nan), update skipped ({row} in a row, {total} in all)" in err


@pytest.mark.parametrize("log_every", [1, 4, 6])
def test_nonfinite_stop_names_the_steps(tmp_path, monkeypatch, log_every):
    steps = _Steps(monkeypatch, nan_at=set(range(2, 100)))
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 consecutive steps \(steps 2\.\.4\)") as e:
        train(_cfg(tmp_path, steps=10, log_every=log_every, max_nonfinite=3))
    assert steps.step == max(4, log_every)  # noticed at the first sync point at or after step 4
    assert ("seen at step 6" in str(e.value)) == (log_every == 6)


def test_nonfinite_stop_comes_before_a_checkpoint(tmp_path, monkeypatch):
    _Steps(monkeypatch, nan_at=set(range(2, 100)))
    with pytest.raises(NonFiniteLossError, match=r"\(steps 2\.\.4\)"):
        train(_cfg(tmp_path, steps=10, log_every=10, save_every=5, max_nonfinite=3))
    assert ckpt.latest_checkpoint(str(tmp_path)) is None  # step 5's checkpoint was not written


def test_foreach_adamw_state_loads_into_the_fused_optimizer():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]

    def adamw(ps, **kw):
        return torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **kw)

    old_p = [p.clone().requires_grad_() for p in params]
    old = adamw(old_p, foreach=True)  # the optimizer of checkpoints written before the fused one
    for g in grads:
        for p, gi in zip(old_p, g):
            p.grad = gi.clone()
        old.step()
    sd = copy.deepcopy(old.state_dict())  # (a state dict shares the live tensors)
    assert sd["param_groups"][0]["fused"] is None
    new_p = [p.detach().clone().requires_grad_() for p in old_p]
    new = adamw(new_p, fused=True)
    _load_optimizer_state(new, sd)
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["foreach"] is None
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 3 for s in new.state.values())
    # one more step each: the same AdamW update (fused and foreach round differently)
    g = [torch.randn_like(p) for p in params]
    for opt, ps in ((old, old_p), (new, new_p)):
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        opt.found_inf = torch.zeros(()) if opt is new else None
        opt.step()
    for a, b in zip(old_p, new_p):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_checkpoint_of_the_foreach_optimizer_resumes_exactly(tmp_path):
    a = tmp_path / "a"
    train(_cfg(a, steps=4, log_every=1, save_every=2, keep=0))
    ck = _ck(a, 2)
    state = copy.deepcopy(ck.state)
    for g in state["optimizer"]["param_groups"]:  # as the foreach AdamW wrote it (its steps: CPU float32)
        g.update(fused=None, foreach=None)
    b = tmp_path / "b"
    ckpt.save_checkpoint(str(b), 2, ck.config, ck.model, ck.ema, state)
    train(_cfg(b, steps=4, log_every=1, resume=True))
    ca, cb = _ck(a, 4), _ck(b, 4)
    assert all(g["fused"] for g in cb.state["optimizer"]["param_groups"])
    for name in ("model", "ema"):
        for k, v in getattr(ca, name).items():
            assert torch.equal(getattr(cb, name)[k], v), (name, k)
