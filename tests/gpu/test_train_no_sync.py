"""A CUDA training step never waits for the device (torch.cuda.set_sync_debug_mode("error") between the sync
points: the log steps); a non-finite step is skipped on the device. Skips without CUDA."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("compile", [False, True])
def test_training_steps_do_not_sync(cuda_device, tmp_path, monkeypatch, compile):
    steps, log_every, nan_at = 9, 4, 6
    sync_points = {s for s in range(1, steps + 1) if s % log_every == 0 or s == steps}
    calls = [0]
    orig = GaussianDiffusion.training_losses

    def patched(self_, *a, **k):
        calls[0] += 1
        s = calls[0]
        # from step s's forward to step s+1's batch: no sync unless s is a sync point (step 1: lazy set-up)
        torch.cuda.set_sync_debug_mode("error" if s > 1 and s not in sync_points else "default")
        out = orig(self_, *a, **k)
        if s == nan_at:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)
    cfg = TrainConfig(dataset="digits", base_channels=32, channel_mults=(1, 2), attention_resolutions=(4,),
                      num_res_blocks=1, groups=8, num_timesteps=100, batch_size=16, lr=1e-3, warmup_steps=3,
                      steps=steps, log_every=log_every, save_every=0, class_cond=True, random_flip=True,
                      dropout=0.1, ema_decay=0.9, progress=False, compile=compile, device=str(cuda_device),
                      out_dir=str(tmp_path))
    try:
        r = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert r.step == steps and r.skipped == 1
    assert [v != v for v in r.losses] == [s == nan_at for s in range(1, steps + 1)]
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        assert [(e["step"], e["skipped"]) for e in map(json.loads, f)] == [(4, 0), (8, 1), (9, 1)]
