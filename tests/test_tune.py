"""tune_timesteps on the exact denoiser of Gaussian data, and the tuned schedules' storage."""
import json
import os

import numpy as np
import pytest
import torch

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.samplers import make_sampler
from fastddpm.schedule import NoiseSchedule
from fastddpm import tune as ft


class GaussianEps:
    """Exact eps prediction for x0 ~ N(0, s2 I): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s2 + 1 - ab)."""

    def __init__(self, schedule, s2=0.25):
        self.ab, self.s2 = schedule.alphas_cumprod, s2

    def __call__(self, x, t):
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * x.double() / (ab * self.s2 + 1 - ab)).to(x.dtype)


@pytest.fixture(scope="module")
def gaussian():
    d = GaussianDiffusion(NoiseSchedule.cosine(1000))
    return GaussianEps(d.schedule), d


def _error(model, d, ts, seed=5, n=64, shape=(1, 4, 4)):
    """Independent check of the objective: mean squared error of DDIM on `ts` against a 200-step DDIM."""
    x = make_sampler("ddim", d, steps=list(ts)).sample(model, (n, *shape), seed=seed)
    ref = make_sampler("ddim", d, steps=200, spacing="uniform").sample(model, (n, *shape), seed=seed)
    return float(((x - ref) ** 2).mean())


def test_tune_improves_on_uniform_for_the_exact_gaussian_model(gaussian):
    model, d = gaussian
    r = ft.tune_timesteps(model, d, "ddim", 4, shape=(1, 4, 4), num_samples=64, val_samples=64, reference_steps=100,
                          max_rounds=3)
    uniform = r.spacing_objectives["uniform"]
    assert set(r.spacing_objectives) >= {"uniform", "logsnr", "karras", "quadratic", "trailing"}
    assert r.accepted and r.val_objective < r.val_initial_objective
    assert r.objective < 0.7 * uniform, (r.objective, uniform)
    assert len(r.timesteps) == 4 and r.timesteps[0] == 999
    assert all(a > b for a, b in zip(r.timesteps, r.timesteps[1:]))
    # on fresh x_T and against another reference solver, the tuned schedule still beats uniform
    assert _error(model, d, r.timesteps) < 0.7 * _error(model, d, make_sampler("ddim", d, steps=4).timesteps.tolist())
    # keep_last: the last timestep stays where the initial schedule put it (trailing's T/S - 1 = 249)
    k = ft.tune_timesteps(model, d, "ddim", 4, shape=(1, 4, 4), num_samples=64, val_samples=64, reference_steps=100,
                          max_rounds=2, init=[999, 749, 499, 249], keep_last=True)
    assert k.timesteps[-1] == 249 and k.timesteps[0] == 999 and k.objective <= k.initial_objective


def test_tune_rejects_stochastic_samplers_and_bad_args(gaussian):
    model, d = gaussian
    with pytest.raises(ValueError, match="deterministic"):
        ft.tune_timesteps(model, d, "dpm++sde", 4, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        ft.tune_timesteps(model, d, "ddim", 1, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="shape is required"):
        ft.tune_timesteps(model, d, "ddim", 4)


def test_tuned_schedule_is_stored_beside_the_checkpoint(tmp_path):
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(b"")
    r = ft.TuneResult("unipc", 3, [999, 400, 20], "logsnr", [999, 500, 0], 1.0, 2.0, 1.5, 2.5, True, 10, 1.0)
    path = ft.save_tuned_schedule(str(ck), r)
    assert path == str(tmp_path / "m.schedules.json")
    r2 = ft.TuneResult("unipc", 5, [999, 700, 400, 100, 0], "logsnr", [999, 700, 400, 100, 0], 1, 1, 1, 1, False, 1, 1)
    ft.save_tuned_schedule(str(ck), r2)
    assert ft.load_tuned_schedules(str(ck)) == {"unipc": {"3": [999, 400, 20], "5": [999, 700, 400, 100, 0]}}
    assert ft.tuned_timesteps(str(ck), "unipc", 3) == [999, 400, 20] and ft.tuned_timesteps(str(ck), "ddim", 3) is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left nothing behind
    d = tmp_path / "ckdir"
    d.mkdir()
    assert ft.schedules_path(str(d)) == str(d / "schedules.json")
    (tmp_path / "bad.schedules.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a fastddpm tuned-schedule file"):
        ft.load_tuned_schedules(str(tmp_path / "bad.safetensors"))


# ---------------------------------------------------------------------------------------------- CLI
def _tiny_checkpoint(tmp_path):
    """A tiny random-weight digits-shaped UNet (T = 50) saved as one .safetensors checkpoint."""
    from fastddpm import checkpoint as ckpt
    from fastddpm.unet import UNet

    torch.manual_seed(0)
    mc = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
              attention_resolutions=(4,), groups=4, dropout=0.0)
    net = UNet(**mc)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the output conv starts at zero: make the output non-trivial
    cfg = {"model": json.loads(json.dumps(net.config)), "diffusion": {"schedule": "cosine", "num_timesteps": 50}}
    path = str(tmp_path / "tiny.safetensors")
    ckpt.save_weights_file(path, net.state_dict(), cfg)
    return path


def test_cli_tune_steps_stores_and_sample_uses_it(tmp_path, capsys):
    from fastddpm.cli import main

    path = _tiny_checkpoint(tmp_path)
    rc = main(["tune-steps", "--checkpoint", path, "--sampler", "ddim", "--steps", "3,4", "--num-samples", "16",
               "--val-samples", "16", "--reference-steps", "10", "--max-rounds", "1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    stored = ft.load_tuned_schedules(path)["ddim"]
    assert {k: v for k, v in stored.items()} == {str(r["steps"]): r["timesteps"] for r in report["results"]}
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", path, "--sampler", "ddim", "--steps", "3", "--num", "4", "--npz", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert "tuned spacing" in capsys.readouterr().out
    from fastddpm.build import load_model
    from fastddpm.images import to_uint8

    model, d, _ = load_model(path)
    want = make_sampler("ddim", d, steps=stored["3"]).sample(model, (4, 1, 8, 8), seed=0)
    assert (np.load(out)["images"] == to_uint8(want)).all()
    from fastddpm.graphs import FastSampler

    fast = FastSampler.from_checkpoint(path, "ddim", 3, batch_size=4)
    assert fast.sampler.timesteps.tolist() == stored["3"] and fast.sampler.spacing == "tuned"
    assert FastSampler.from_checkpoint(path, "ddim", 3, spacing="uniform", batch_size=4).sampler.spacing == "uniform"
    assert main(["sample", "--checkpoint", path, "--sampler", "ddim", "--steps", "5", "--spacing", "tuned",
                 "--num", "2", "--no-progress"]) == 1
    assert "holds no schedule for ddim at 5 steps" in capsys.readouterr().err
    assert main(["tune-steps", "--checkpoint", path, "--sampler", "dpm++sde", "--no-progress"]) == 1


def test_bf16_model_calls_stay_close_to_fp32(tmp_path, capsys):
    """--dtype bf16: the model runs in bf16 (weights cast once), x and the step math in fp32. On this tiny
    random model, 3 DDIM steps: relative L2 difference to fp32 under 2% (bf16 has 8 mantissa bits, ~0.4%
    per rounding; a few layers and steps compound it), and the sampler state is fp32."""
    from fastddpm.build import load_model
    from fastddpm.graphs import FastSampler
    from fastddpm.precision import ReducedPrecisionModel, reduced_precision

    path = _tiny_checkpoint(tmp_path)
    model, d, _ = load_model(path)
    s = make_sampler("ddim", d, steps=3)
    ref = s.sample(model, (6, 1, 8, 8), seed=1, clip_denoised=False)
    low = reduced_precision(model, "bf16")
    assert isinstance(low, ReducedPrecisionModel) and next(model.parameters()).dtype == torch.float32
    x = s.sample(low, (6, 1, 8, 8), seed=1, clip_denoised=False)
    assert x.dtype == torch.float32
    rel = float((x - ref).detach().norm() / ref.detach().norm())
    assert 0 < rel < 0.02, rel
    fast = FastSampler(model, s, batch_size=6, dtype="bf16", clip_denoised=False)
    assert fast.x.dtype == torch.float32 and fast.model_dtype == torch.bfloat16
    assert torch.allclose(fast(seed=1), x, atol=1e-5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        FastSampler(model, s, batch_size=2, dtype="int8")
    out = tmp_path / "b.npz"
    assert main_sample(["--checkpoint", path, "--sampler", "ddim", "--steps", "3", "--num", "2", "--dtype", "bf16",
                        "--npz", str(out)]) == 0
    assert "bf16" in capsys.readouterr().out


def main_sample(args):
    from fastddpm.cli import main

    return main(["sample", "--no-progress", "--device", "cpu", *args])
