"""Bad input to the public API gives a ValueError naming the argument (or a clear error), never a
traceback from deep inside torch; sampling that goes NaN says at which step."""
import json
import os

import pytest
import torch

import fastddpm as fd
from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm.cli import main
from fastddpm.guards import NonFiniteSampleError
from fastddpm.ops.sampler_step import sampler_step, sampler_step_
from fastddpm.samplers import make_sampler

TINY_FLAGS = ["--dataset", "digits", "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "4",
              "--num-res-blocks", "1", "--groups", "4", "--num-timesteps", "50", "--batch-size", "8",
              "--warmup-steps", "2", "--no-progress", "--no-compile"]


def _unet(**kw):
    torch.manual_seed(0)
    return fd.UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), groups=4, dropout=0.0, **kw).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", *TINY_FLAGS, "--steps", "2", "--save-every", "0", "--out-dir", str(d)]) == 0
    return d


# ------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("betas", ["abc", b"abc", ["a", "b"], {"a": 1}, object()])
def test_noise_schedule_refuses_non_numbers(betas):
    with pytest.raises(ValueError, match="betas must be a non-empty 1-D sequence"):
        fd.NoiseSchedule(betas)


# ------------------------------------------------------------------------------ U-Net inputs
def test_unet_casts_float64_and_refuses_integer_images():
    model = _unet()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 7])
    with torch.no_grad():
        out = model(x, t)
        ref = model(x.float(), t)
    assert out.dtype == torch.float32 and torch.equal(out, ref)  # run in the model's dtype
    with pytest.raises(ValueError, match="x must be a floating-point tensor.*torch.int64"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.int64), t)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        model([[0.0]], t)


@pytest.mark.parametrize("t,match", [
    (torch.tensor([-1, 3]), r"t must be timesteps in >= 0, got values in \[-1, 3\]"),
    (torch.tensor([0.5, 1.0]), "t must hold integer timesteps"),
    (2.5, "t must be an integer timestep"),
    (True, "t must be an integer timestep"),
    ("3", "t must be an integer timestep"),
])
def test_unet_refuses_bad_timesteps(t, match):
    with pytest.raises(ValueError, match=match):
        _unet()(torch.zeros(2, 1, 8, 8), t)


def test_unet_refuses_t_beyond_the_schedule_when_known(run_dir):
    model, diffusion, _ = build.load_model(str(run_dir))
    assert model.num_timesteps == diffusion.num_timesteps == 50
    x = torch.zeros(1, 1, 8, 8)
    with torch.no_grad():
        model(x, 49)
        import numpy as np

        torch.testing.assert_close(model(x, np.int64(7)), model(x, torch.tensor([7])))  # numpy ints are ints
        with pytest.raises(ValueError, match=r"t must be timesteps in \[0, 50\), got values in \[50, 50\]"):
            model(x, 50)


@pytest.mark.parametrize("y", [[-1, 0], [0, 4]])
def test_labels_out_of_range(y):
    model = _unet(num_classes=3)
    x = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        model(x, 1, torch.tensor([3, 0]))  # 3 = the null class
        with pytest.raises(ValueError, match=r"y must be class labels in \[0, 3\] \(3 = the null class\)"):
            model(x, 1, torch.tensor(y))
        sampler = fd.DDIMSampler(fd.GaussianDiffusion(fd.NoiseSchedule.linear(50)), steps=2)
        with pytest.raises(ValueError, match=r"y must be class labels"):
            sampler.sample(model, (2, 1, 8, 8), model_kwargs={"y": torch.tensor(y)})
    with pytest.raises(ValueError, match=r"labels must be class labels in \[0, 3\]"):
        fd.FastSampler(model, sampler, batch_size=2, labels=torch.tensor(y), guidance_scale=2.0)


def test_float64_sampling_on_a_float32_model():
    model = _unet()
    sampler = fd.DDIMSampler(fd.GaussianDiffusion(fd.NoiseSchedule.linear(50)), steps=3)
    with torch.no_grad():
        ref = sampler.sample(model, (2, 1, 8, 8), seed=1)
        x64 = sampler.sample(model, (2, 1, 8, 8), seed=1, dtype=torch.float64)
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), ref, rtol=1e-5, atol=1e-5)
    fast = fd.FastSampler(model, sampler, batch_size=2, dtype=torch.float64)
    torch.testing.assert_close(fast(seed=1).float(), ref, rtol=1e-5, atol=1e-5)


def test_sampler_step_row_out_of_range():
    x = torch.zeros(1, 1, 2, 2)
    coefs = torch.zeros(4, 9)
    for bad in (4, -1):
        step = torch.tensor([bad])
        with pytest.raises(ValueError, match=rf"step must index a row of coefs: 0 <= step < 4, got {bad}"):
            sampler_step(x, x, coefs, step)
        with pytest.raises(ValueError, match="step must index a row of coefs"):
            sampler_step_(x, x, coefs, step, torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------------------ NaN during sampling
class _NaNFrom(torch.nn.Module):
    """eps = 0.1 x, NaN from model timestep `bad` on (the timesteps descend, so that step and the rest)."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad
        self.in_channels, self.image_size = 1, 4

    def forward(self, x, t):
        out = 0.1 * x
        return torch.where((t <= self.bad)[:, None, None, None], torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_nan_in_sampling_names_the_step(name):
    diffusion = fd.GaussianDiffusion(fd.NoiseSchedule.linear(50))
    sampler = make_sampler(name, diffusion, 5)
    ts = [int(v) for v in sampler._model_timesteps]  # the model timestep of each step, descending
    model = _NaNFrom(ts[2])
    with pytest.raises(NonFiniteSampleError, match=rf"at step 2 \(model timestep t={ts[2]}\)"):
        sampler.sample(model, (2, 1, 4, 4), seed=0)
    fast = fd.FastSampler(model, sampler, batch_size=2, image_shape=(1, 4, 4))
    with pytest.raises(NonFiniteSampleError, match=rf"FastSampler: x became NaN/inf at step 2 \(model timestep "
                                                   rf"t={ts[2]}\)"):
        fast(seed=0)
    fine = _NaNFrom(-1)
    assert torch.isfinite(sampler.sample(fine, (2, 1, 4, 4), seed=0)).all()
    assert torch.isfinite(fd.FastSampler(fine, sampler, batch_size=2, image_shape=(1, 4, 4))(seed=0)).all()


# ------------------------------------------------------------------------------ CLI: device, checkpoints
def test_device_tpu_is_one_line(run_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "tpu", "--npz", str(tmp_path / "a.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm sample: error: --device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                          "got 'tpu'") and err.count("\n") == 1
    assert main(["train", *TINY_FLAGS, "--steps", "1", "--device", "tpu", "--out-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "fastddpm train: error: device must be" in err and err.count("\n") == 1


def _edit_state(run_dir, tmp_path, edit, keep_checksums=False):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(run_dir, out)
    d = out / "checkpoints" / "step_00000002"
    st = torch.load(d / "state.pt", weights_only=True)
    edit(st)
    torch.save(st, d / "state.pt")
    if not keep_checksums:  # as someone who edits the state and recreates the checksums with sha256sum
        names = [n for n in ("config.json", "model.safetensors", "ema.safetensors", "state.pt") if (d / n).exists()]
        (d / ckpt.CHECKSUMS_FILE).write_text("".join(f"{ckpt.sha256_file(str(d / n))}  {n}\n" for n in names))
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda st: st.update(step=10**9), r"'step' is 1000000000 but the checkpoint is of step 2"),
    (lambda st: st.update(step="2"), r"'step' must be a non-negative int, got '2'"),
    (lambda st: st.update(updates=5), r"'updates' \(5\) \+ 'skipped' \(0\) must equal 'step' \(2\)"),
    (lambda st: st.pop("rng"), r"missing entry 'rng'"),
    (lambda st: st["rng"][0].update(cpu=torch.zeros(3, dtype=torch.uint8)), r"'rng' must hold a 'cpu' uint8"),
    (lambda st: st.update(optimizer=[1, 2]), r"'optimizer' must be an optimizer state dict"),
])
def test_hand_edited_state_is_one_line(run_dir, tmp_path, capsys, edit, match):
    out = _edit_state(run_dir, tmp_path, edit)
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm train: error: ") and "state.pt: " in err
    import re

    assert re.search(match, err), err
    assert "Traceback" not in err


def test_hand_edited_state_with_checksums_is_caught_by_them(run_dir, tmp_path):
    out = _edit_state(run_dir, tmp_path, lambda st: st.update(step=10**9), keep_checksums=True)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: SHA-256 mismatch"):
        ckpt.load_checkpoint(str(out))


@pytest.mark.parametrize("damage", ["delete", "partial"])
def test_checkpoint_without_checksums_is_refused(run_dir, tmp_path, capsys, damage):
    """A deleted (or partial) checksums.sha256 used to turn verification off: a flipped byte then resumed."""
    import shutil

    out = tmp_path / "nosums"
    shutil.copytree(run_dir, out)
    d = out / "checkpoints" / "step_00000002"
    sums = d / ckpt.CHECKSUMS_FILE
    if damage == "delete":
        os.remove(sums)
    else:
        sums.write_text("".join(l + "\n" for l in sums.read_text().splitlines() if "model.safetensors" not in l))
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    (d / "model.safetensors").write_bytes(bytes(data))
    what = "is missing" if damage == "delete" else "does not list model.safetensors"
    with pytest.raises(ckpt.CheckpointError, match=rf"checksums\.sha256 {what}: nothing would verify"):
        ckpt.load_checkpoint(str(d))
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm train: error: ") and f"checksums.sha256 {what}" in err and "Traceback" not in err
    assert ckpt.list_checkpoints(str(out))[-1][0] == 2  # nothing trained on the damaged weights
    assert main(["sample", "--checkpoint", str(d), "--npz", str(tmp_path / "a.npz")]) == 1
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "base_channels", 200000, r"base_channels=200000 exceeds the bound 4096"),
    ("model", "channel_mults", [1] * 40, r"levels=40 exceeds the bound 12"),
    ("model", "num_classes", 10**9, r"num_classes=1000000000 exceeds the bound 1000000"),
    ("diffusion", "num_timesteps", 10**12, r"num_timesteps=1000000000000 exceeds the bound 100000"),
    ("diffusion", "num_timesteps", "1000", r"num_timesteps must be a positive int, got '1000'"),
])
def test_absurd_config_values_are_refused_before_allocating(run_dir, tmp_path, capsys, section, key, value, match):
    import shutil

    out = tmp_path / "absurd"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg[section][key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match=match):
        build.load_model(str(out))
    assert main(["sample", "--checkpoint", str(out), "--npz", str(tmp_path / "a.npz")]) == 1
    assert "fastddpm sample: error:" in capsys.readouterr().err


def test_nan_sample_grid_during_training_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    from fastddpm.guards import NonFiniteSampleError
    from fastddpm.samplers import Sampler
    from fastddpm.train import TrainConfig, train

    def nan_sample(self, *a, **k):
        raise NonFiniteSampleError("DPMSolverSampler: x became NaN/inf at step 3")

    monkeypatch.setattr(Sampler, "sample", nan_sample)
    r = train(TrainConfig(dataset="digits", base_channels=8, channel_mults=(1,), attention_resolutions=(), groups=4,
                          num_res_blocks=1, num_timesteps=50, steps=2, batch_size=4, warmup_steps=0, progress=False,
                          compile=False, sample_every=1, sample_num=2, sample_steps=2, out_dir=str(tmp_path / "r")))
    assert r.step == 2  # training went on
    err = capsys.readouterr().err
    assert "step 1: no sample grid: DPMSolverSampler: x became NaN/inf at step 3" in err
    assert not (tmp_path / "r" / "samples").exists()
