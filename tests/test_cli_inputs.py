"""Bad flags and files of the sampling commands: one line naming the flag or file, checked before any
work starts (sizes, eta, guidance, outputs, seeds, weights), and one behaviour for the same thing."""
import json
import math
import os

import numpy as np
import pytest
import torch

import fastddpm as fd
from fastddpm import checkpoint as ckpt
from fastddpm.cli import main


def _tiny(tmp_path, scale_weights=None, nan=False, name="m.safetensors"):
    from fastddpm.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), groups=4, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if scale_weights is not None:  # finite, but far beyond a trained model: flat images before
            next(iter(net.parameters())).mul_(scale_weights)
        if nan:
            next(iter(net.parameters())).view(-1)[0] = float("nan")
    cfg = {"model": json.loads(json.dumps(net.config)), "diffusion": {"schedule": "cosine", "num_timesteps": 50}}
    path = str(tmp_path / name)
    ckpt.save_weights_file(path, net.state_dict(), cfg)
    return path


def _err(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


SAMPLE = ["sample", "--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("flags,match", [
    (["--scale", "100000"], "fastddpm sample: error: --scale 100000 / --num 64: the grid image would take"),
    (["--num", str(10**12), "--npz", "X"], f"fastddpm sample: error: --num {10**12}: the images take"),
    (["--batch-size", str(10**5), "--num", str(10**5), "--npz", "X"],
     # the bundled model: 8x8 images, widest activations 32 * 2 channels, fp32, eight alive at once
     f"fastddpm sample: error: --batch-size {10**5}: one batch needs about {10**5 * 64 * 64 * 4 * 8 / 2**30:.3g} "
     f"GiB, more than the 1 GiB free; use --batch-size {2**30 // (64 * 64 * 4 * 8)} or less"),
    (["--eta", "0.7"], "fastddpm sample: error: --eta applies to --sampler ddim only; --sampler unipc has no eta"),
    (["--guidance-scale", "3"], "fastddpm sample: error: --guidance-scale 3.0 needs a class-conditional model"),
    (["--guidance-scale", "nan"], "fastddpm sample: error: --guidance-scale must be a finite number, got nan"),
    (["--out", ""], "fastddpm sample: error: --out must be a file path, got an empty string"),
    (["--npz", ""], "fastddpm sample: error: --npz must be a file path, got an empty string"),
    (["--seed", str(2**70)], f"fastddpm sample: error: --seed must be an int in [0, 2**63), got {2**70}"),
])
def test_sample_refuses_before_sampling(tmp_path, capsys, monkeypatch, flags, match):
    from fastddpm.samplers import Sampler

    def never(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(Sampler, "sample", never)
    monkeypatch.setattr("fastddpm.cli._sizes.available_memory", lambda device="cpu": 1 << 30)  # a 1 GiB machine
    monkeypatch.chdir(tmp_path)
    flags = [str(tmp_path / "x.npz") if f == "X" else f for f in flags]
    assert main([*SAMPLE, *flags]) == 1
    assert _err(capsys).startswith(match)
    assert os.listdir(tmp_path) == []


def test_sample_out_under_a_file_names_out(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([*SAMPLE, "--num", "2", "--out", str(tmp_path / "afile" / "x.png")]) == 1
    assert _err(capsys).startswith(f"fastddpm sample: error: --out {tmp_path / 'afile' / 'x.png'}: "
                                   f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_full_disk_names_the_output(tmp_path, capsys, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastddpm.fileio.atomic_write_bytes", full)
    out = tmp_path / "a.npz"
    assert main([*SAMPLE, "--num", "2", "--npz", str(out)]) == 1
    assert _err(capsys) == f"fastddpm sample: error: --npz {out}: cannot write: No space left on device\n"


@pytest.mark.parametrize("how,match", [("nan", r"hold 1 NaN/inf values"),
                                       ("huge", r"reach \d\.\d+e\+30, beyond any trained model \(bound 1e\+06\)")])
def test_sample_and_eval_refuse_broken_weights(tmp_path, capsys, how, match):
    import re

    path = _tiny(tmp_path, nan=how == "nan", scale_weights=1e31 if how == "huge" else None)
    assert main([*SAMPLE, "--checkpoint", path, "--sampler", "dpm++", "--npz", str(tmp_path / "a.npz")]) == 1
    err = _err(capsys)
    assert err.startswith(f"fastddpm sample: error: --checkpoint {path}: the weights ") and re.search(match, err)
    assert main(["eval", "--checkpoint", path, "--num", "2", "--steps", "2", "--no-progress", "--device", "cpu"]) == 1
    assert re.search(match, _err(capsys))
    assert not (tmp_path / "a.npz").exists()


def test_eval_defaults_to_samples_sampler():
    from fastddpm._names import DEFAULT_SAMPLER
    from fastddpm.cli import build_parser

    p = build_parser()
    assert p.parse_args(["eval"]).sampler == p.parse_args(["sample"]).sampler == DEFAULT_SAMPLER


def test_eval_empty_ref_stats_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert main(["eval", "--ref-stats", str(empty), "--num", "2", "--steps", "2", "--no-progress",
                 "--device", "cpu"]) == 1
    assert _err(capsys).startswith(f"fastddpm eval: error: cannot read reference statistics from '{empty}': EOFError")


def test_digits_features_on_rgb_images_name_the_option():
    from fastddpm.features import get_extractor

    ex = get_extractor("digits")
    with pytest.raises(ValueError, match=r"the digits features \(features='digits', `fastddpm eval --features "
                                         r"digits`.*use features='inception' \(--features inception\)"):
        ex(torch.zeros(2, 3, 8, 8))


def test_convert_a_folder_of_pngs_says_not_a_unet_folder(tmp_path, capsys):
    pytest.importorskip("diffusers")
    fd.save_grid(torch.zeros(1, 1, 8, 8), str(tmp_path / "a.png"))
    assert main(["convert", str(tmp_path), str(tmp_path / "o.safetensors")]) == 1
    assert _err(capsys).startswith(f"fastddpm convert: error: {tmp_path}: not a UNet2DModel folder")


def test_sample_accepts_a_diffusers_pipeline_folder_like_fd_load(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 layers_per_block=1, norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        tmp_path / "pipe")
    out = tmp_path / "a.npz"
    assert main([*SAMPLE, "--checkpoint", str(tmp_path / "pipe"), "--num", "2", "--npz", str(out)]) == 0
    images = np.load(out)["images"]
    pipe = fd.load(str(tmp_path / "pipe"), device="cpu")
    sampler = fd.make_sampler("unipc", pipe.diffusion, steps=2)
    ref = fd.to_uint8(sampler.sample(pipe.unet, (2, 1, 8, 8), seed=0))
    assert images.shape == (2, 8, 8, 1) and np.array_equal(images, ref)


@pytest.mark.parametrize("command", ["sample", "train", "eval", "nll", "convert", "bench", "tune-steps"])
def test_every_command_takes_threads(command):
    from fastddpm.cli import build_parser

    extra = {"convert": ["src", "out.safetensors"]}.get(command, [])
    assert build_parser().parse_args([command, *extra, "--threads", "3"]).threads == 3


def test_tune_steps_refuses_negative_max_seconds(capsys):
    assert main(["tune-steps", "--max-seconds", "-1", "--device", "cpu", "--no-progress"]) == 1
    assert _err(capsys) == "fastddpm tune-steps: error: --max-seconds must be a number of seconds > 0, got -1.0\n"


def test_train_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    segments = {s.split()[0]: s for s in text.split(" --")}  # one per option
    for flag in ("image-size", "channels", "no-compile", "steps", "dropout"):
        assert segments[flag].count("default") == 1, segments[flag]


def test_save_grid_default_scale_is_what_sample_writes(tmp_path):
    from PIL import Image

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    api = np.asarray(Image.open(fd.save_grid(x, str(tmp_path / "api.png"))))
    assert api.shape == ((1 + 4 * 9) * 4,) * 2  # 8x8 tiles drawn 4x, as `fastddpm sample` does
    assert main(["sample", "--num", "16", "--steps", "2", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "cli.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "cli.png")).shape == api.shape


@pytest.mark.parametrize("fn", ["to_uint8", "to_pil", "save_grid"])
def test_nan_images_are_refused_not_written_black(tmp_path, fn):
    x = torch.zeros(2, 1, 4, 4)
    x[1, 0, 2, 2] = float("nan")
    args = (str(tmp_path / "g.png"),) if fn == "save_grid" else ()
    with pytest.raises(ValueError, match=r"images hold 1 NaN values"):
        getattr(fd, fn)(x, *args)
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------------------------------------ API: accepted silently before
def test_linear_schedule_refuses_start_above_end():
    with pytest.raises(ValueError, match=r"beta_start must be <= beta_end .* got beta_start=0.5, beta_end=0.1"):
        fd.NoiseSchedule.linear(beta_start=0.5, beta_end=0.1)


def test_respace_refuses_fractional_timesteps():
    s = fd.NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match=r"timesteps must be integers, got \[2.5\]"):
        s.respace([2.5])
    assert s.respace([2.0, 5]).timestep_map.tolist() == [2, 5]


def test_load_device_tpu_is_a_value_error():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'tpu'"):
        fd.load(device="tpu")


# ------------------------------------------------------------------------------ API threads
def test_api_sampling_runs_small_models_on_one_thread_and_restores(monkeypatch):
    import fastddpm.threads as th

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default = th.TORCH_DEFAULT_THREADS
    if default < 2:
        monkeypatch.setattr(th, "TORCH_DEFAULT_THREADS", 2)  # a one-core box: pretend the default was 2
        torch.set_num_threads(2)
    before = torch.get_num_threads()
    seen = []
    pipe = fd.load(device="cpu")
    orig = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()), orig(*a, **k))[1])
    pipe(2, seed=0, num_inference_steps=2)
    assert seen and set(seen) == {1}                      # the bundled (small) model ran on one thread
    assert torch.get_num_threads() == before              # the caller's setting is back
    torch.set_num_threads(before + 1 if before + 1 != th.TORCH_DEFAULT_THREADS else before + 2)
    chosen = torch.get_num_threads()
    seen.clear()
    pipe(2, seed=0, num_inference_steps=2)
    assert set(seen) == {chosen} and torch.get_num_threads() == chosen  # a count the caller chose is kept
    torch.set_num_threads(default)


# ------------------------------------------------------------------------------ install
def test_triton_is_a_test_extra_and_fastddpm_imports_without_it(tmp_path):
    import ast
    import subprocess
    import sys

    setup = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", "setup.py")).read())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    assert not [r for r in kw["install_requires"] if r.startswith("triton")]
    assert [r for r in kw["extras_require"]["test"] if r.startswith("triton")]
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ImportError('no triton')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import fastddpm as fd\n"
            "x = fd.load(device='cpu')(2, seed=0, num_inference_steps=2, output_type='np').images\n"
            "print(x.shape, 'triton' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(2, 8, 8, 1) False"


@pytest.mark.parametrize("flags,message", [
    (["--channel-mults", ""], "--channel-mults must be a non-empty list of positive ints (one per level), e.g. 1,2,2,2"),
    (["--out-dir", ""], "--out-dir must be a folder path, got an empty string"),
    (["--seed", str(2**70)], f"--seed must be an int in [0, 2**63), got {2**70}"),
])
def test_train_flags_named_rightly(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "1", "--no-progress", *flags]) == 1
    assert _err(capsys) == f"fastddpm train: error: {message}\n"
    assert os.listdir(tmp_path) == []  # nothing written (an empty --out-dir would have meant the current folder)


def test_full_disk_during_training_names_the_file(tmp_path, capsys, monkeypatch):
    import errno

    from fastddpm import fileio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "r"
    monkeypatch.setattr(fileio.os, "fsync", full)
    assert main(["train", "--dataset", "digits", "--base-channels", "8", "--channel-mults", "1,2",
                 "--attention-resolutions", "4", "--num-res-blocks", "1", "--groups", "4", "--num-timesteps", "50",
                 "--batch-size", "8", "--steps", "1", "--no-progress", "--no-compile", "--out-dir", str(out)]) == 1
    err = _err(capsys)
    assert err.startswith("fastddpm train: error: [Errno 28] No space left on device: ") and str(out) in err


def test_nan_during_sampling_is_one_line(tmp_path, capsys, monkeypatch):
    from fastddpm.guards import NonFiniteSampleError
    from fastddpm.samplers import Sampler

    def nan(*a, **k):
        raise NonFiniteSampleError("UniPCSampler: x became NaN/inf at step 1 (model timestep t=899)")

    monkeypatch.setattr(Sampler, "sample", nan)
    assert main([*SAMPLE, "--num", "2", "--npz", str(tmp_path / "a.npz")]) == 1
    assert _err(capsys) == "fastddpm sample: error: UniPCSampler: x became NaN/inf at step 1 (model timestep t=899)\n"


def test_make_sampler_warns_that_eta_is_ignored():
    d = fd.GaussianDiffusion(fd.NoiseSchedule.linear(50))
    with pytest.warns(UserWarning, match=r"eta=0.7 is ignored: only the 'ddim' sampler has an eta"):
        fd.make_sampler("dpm++", d, steps=4, eta=0.7)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.make_sampler("ddim", d, steps=4, eta=0.7)
        fd.make_sampler("dpm++", d, steps=4)


def test_pipeline_default_is_what_fastddpm_sample_draws(tmp_path):
    """fd.load()(n) and `fastddpm sample --num n` (no other flags): the same sampler, steps and (tuned)
    timesteps, so the same images for the same seed."""
    from fastddpm._names import DEFAULT_SAMPLER, DEFAULT_STEPS

    pipe = fd.load(device="cpu")
    s, _ = pipe.sampler()
    assert type(s).__name__ == type(fd.make_sampler(DEFAULT_SAMPLER, pipe.diffusion)).__name__
    assert s.num_steps == DEFAULT_STEPS[DEFAULT_SAMPLER]
    api = pipe(8, seed=0, output_type="np").images
    assert main(["sample", "--num", "8", "--no-progress", "--device", "cpu", "--npz", str(tmp_path / "a.npz")]) == 0
    cli = np.load(tmp_path / "a.npz")["images"]
    assert api.shape == cli.shape and np.abs(api.astype(int) - cli.astype(int)).max() <= 1
