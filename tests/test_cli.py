"""The fastddpm CLI: train and sample end to end on tiny checkpoints, sharded sampling, error messages."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm.cli import main
from ddp_helpers import as_rank, free_port

TINY_FLAGS = ["--dataset", "digits", "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "4",
              "--num-res-blocks", "1", "--groups", "4", "--num-timesteps", "50", "--batch-size", "8",
              "--warmup-steps", "2", "--no-progress", "--no-compile", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY_FLAGS, "--steps", "3", "--save-every", "0", "--out-dir", str(d)]) == 0
    return str(d)


def _sample(args, capsys=None):
    rc = main(["sample", "--no-progress", *args])
    return rc


def test_train_cli_writes_config_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 2, "lr": 5e-4}))
    out = tmp_path / "r"
    assert main(["train", *TINY_FLAGS, "--config", str(cfg), "--out-dir", str(out)]) == 0
    ck = ckpt.load_checkpoint(str(out))
    assert ck.step == 2 and ck.config["train"]["lr"] == 5e-4
    assert ck.config["model"]["channel_mults"] == [1, 2] and ck.config["model"]["attention_resolutions"] == [4]
    assert ck.config["diffusion"]["num_timesteps"] == 50
    # without --resume an existing run is not overwritten; with it, training continues to --steps
    assert main(["train", *TINY_FLAGS, "--steps", "3", "--out-dir", str(out)]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", *TINY_FLAGS, "--steps", "4", "--out-dir", str(out), "--resume", "--sample-every", "2",
                 "--sample-num", "3", "--sample-steps", "2"]) == 0
    assert ckpt.load_checkpoint(str(out)).step == 4
    from PIL import Image

    # step 2: the first run's end (a run shorter than --sample-every draws one grid at its end)
    assert sorted(os.listdir(out / "samples")) == ["step_00000002.png", "step_00000004.png"]
    with Image.open(out / "samples" / "step_00000004.png") as im:  # 2x2 grid of 8x8 tiles, scale 64 // 8
        assert im.size == ((1 + 2 * 9) * 8, (1 + 2 * 9) * 8)
    with pytest.raises(SystemExit) as e:
        main(["train", "--schedule", "quadratic"])
    assert e.value.code == 2


def test_sample_png_and_npz_match_the_sampler(tiny_run, tmp_path):
    from PIL import Image

    from fastddpm.images import to_uint8
    from fastddpm.samplers import DDIMSampler

    png, npz = tmp_path / "g.png", tmp_path / "x.npz"
    assert _sample(["--checkpoint", tiny_run, "--sampler", "ddim", "--steps", "3", "--num", "5", "--batch-size", "2",
                    "--seed", "7", "--out", str(png), "--npz", str(npz)]) == 0
    images = np.load(npz)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    model, diff, _ = build.load_model(tiny_run)
    with torch.no_grad():
        ref = to_uint8(DDIMSampler(diff, steps=3).sample(model, (5, 1, 8, 8), seed=7))
    np.testing.assert_array_equal(images, ref)  # batches of 2 give what one batch of 5 gives
    # grid: 3 per row, 2 rows, 1-pixel padding, scale 4 (32-pixel tiles for 8x8 images)
    with Image.open(png) as im:
        assert im.size == ((1 + 3 * 9) * 4, (1 + 2 * 9) * 4) and im.mode == "L"
        grid = np.asarray(im)
    np.testing.assert_array_equal(grid[4:36:4, 4:36:4], images[0, :, :, 0])
    np.testing.assert_array_equal(grid[4 + 36:36 + 36:4, 4 + 36:36 + 36:4], images[4, :, :, 0])


def test_sample_class_conditional_with_guidance(tmp_path):
    run = tmp_path / "cond"
    assert main(["train", *TINY_FLAGS, "--class-cond", "--steps", "1", "--out-dir", str(run)]) == 0
    npz = tmp_path / "c.npz"
    assert _sample(["--checkpoint", str(run), "--steps", "2", "--num", "3", "--guidance-scale", "2.0",
                    "--npz", str(npz)]) == 0
    z = np.load(npz)
    assert z["images"].shape == (3, 8, 8, 1) and z["labels"].tolist() == [0, 1, 2]
    assert _sample(["--checkpoint", str(run), "--steps", "2", "--num", "2", "--class-label", "7",
                    "--npz", str(npz)]) == 0
    assert np.load(npz)["labels"].tolist() == [7, 7]


def test_sample_errors(tiny_run, tmp_path, capsys):
    assert _sample(["--checkpoint", str(tmp_path / "nope"), "--npz", str(tmp_path / "a.npz")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.latest_checkpoint(tiny_run), bad)
    data = (bad / "ema.safetensors").read_bytes()
    (bad / "ema.safetensors").write_bytes(data[: len(data) // 2])
    assert _sample(["--checkpoint", str(bad), "--npz", str(tmp_path / "a.npz")]) == 1
    err = capsys.readouterr().err
    assert "ema.safetensors: truncated or corrupt" in err and err.startswith("fastddpm sample: error:")
    (bad / "ema.safetensors").write_bytes(data)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["channel_mults"] = [1, 2, 2]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert _sample(["--checkpoint", str(bad), "--npz", str(tmp_path / "a.npz")]) == 1
    assert "do not match the model architecture" in capsys.readouterr().err
    assert not (tmp_path / "a.npz").exists()
    assert _sample(["--checkpoint", tiny_run, "--num", "0"]) == 1
    assert "--num must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", "--sampler", "euler"])
    assert e.value.code == 2


def test_python_dash_m_reports_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--checkpoint", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 1
    assert "fastddpm sample: error:" in r.stderr and "missing: checkpoint not found" in r.stderr


# ------------------------------------------------------------------------------ sharded sampling
def _sample_worker(rank, world, port, argv):
    as_rank(rank, world, port)
    assert main(argv) == 0


def test_sample_sharded_over_two_processes_matches_one(tiny_run, tmp_path):
    import torch.multiprocessing as mp

    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["sample", "--no-progress", "--checkpoint", tiny_run, "--steps", "2", "--num", "5", "--batch-size", "2"]
    assert main([*args, "--npz", str(one)]) == 0
    mp.start_processes(_sample_worker, args=(2, free_port(), [*args, "--npz", str(two), "--out", str(tmp_path / "g.png")]),
                       nprocs=2, join=True, start_method="fork")
    np.testing.assert_array_equal(np.load(two)["images"], np.load(one)["images"])
    assert (tmp_path / "g.png").exists()


# ------------------------------------------------------------------------------ the bundled model
@pytest.mark.skipif(not os.path.isfile(ckpt.BUNDLED_MODEL), reason="bundled model not built yet")
def test_bundled_model_draws_digits(tmp_path):
    from fastddpm.data import load_dataset

    npz = tmp_path / "d.npz"
    assert _sample(["--num", "32", "--npz", str(npz)]) == 0  # defaults: bundled model, DPM-Solver++ 20 steps
    x = np.load(npz)["images"].astype(np.float64).reshape(32, -1)
    data = load_dataset("digits").images.numpy().astype(np.float64).reshape(1797, -1)
    noise = np.random.default_rng(0).integers(0, 256, size=x.shape).astype(np.float64)

    def nn_dist(a):
        d = ((a[:, None, :] - data[None, :, :]) ** 2).sum(-1)
        return np.sqrt(d.min(1)).mean()

    # samples lie near the data manifold: nearest training digit much closer than for uniform noise,
    # and within a factor of the typical spacing between distinct training digits
    spacing = np.sqrt(np.sort(((data[:200, None] - data[None]) ** 2).sum(-1), axis=1)[:, 1]).mean()
    assert nn_dist(x) < 0.5 * nn_dist(noise)
    assert nn_dist(x) < 1.6 * spacing, (nn_dist(x), spacing)  # bundled model: ~1.3x; Gaussian blobs: ~2.6x
    assert abs(x.mean() - data.mean()) < 25  # mean grey level within 25/255


def test_every_command_module_is_listed_and_complete(capsys):
    """One module per sub-command under fastddpm/cli/, each with HELP, configure and run, all in --help."""
    import pkgutil

    from fastddpm import cli

    found = {m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_")}
    assert found == set(cli.COMMAND_MODULES.values())
    table = cli.commands()
    assert list(table) == list(cli.COMMAND_MODULES)
    for name, cmd in table.items():
        assert cmd.help and callable(cmd.configure) and callable(cmd.run), name
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in table:  # argparse puts a long name's help on the next line
        assert f"    {name} " in out or f"    {name}\n" in out, name


# ------------------------------------------------------------------------------ torchrun command lines
def _documented_torchrun_commands():
    import shlex

    from fastddpm.cli import sample as sample_cli, train as train_cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pages = [os.path.join(root, "README.md"), os.path.join(root, "docs", "training.md")]
    texts = [open(p, encoding="utf-8").read() for p in pages] + [sample_cli.__doc__, train_cli.__doc__]
    out = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip().strip("`")
            if line.startswith("torchrun "):
                out.append([w for w in shlex.split(line.split("#")[0]) if w != "..."])
    return out


def test_documented_torchrun_commands_parse_as_written():
    """torchrun's own parser sees the whole command line first (it rejects e.g. `--num`, an abbreviation
    of its --numa-binding): every documented DDP command must get through it and then through ours."""
    from torch.distributed.run import get_args_parser

    from fastddpm.cli import build_parser

    cmds = _documented_torchrun_commands()
    assert any("sample" in c for c in cmds) and any("train" in c for c in cmds)
    for cmd in cmds:
        ns = get_args_parser().parse_args(cmd[1:])
        assert ns.module and ns.training_script == "fastddpm", cmd
        build_parser().parse_args(ns.training_script_args)
    # and every long flag of the DDP commands (bar the plain-use alias --num) passes torchrun untouched
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("sample", "train"):
        for action in sub[name]._actions:
            for flag in action.option_strings:
                if flag in ("--num", "-h", "--help"):
                    continue
                ns = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "fastddpm", name, flag, "1"])
                assert ns.training_script_args == [name, flag, "1"], flag


# ------------------------------------------------------------------ a newcomer's paths (issue 11)
@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_thread_count_follows_the_model_size(keep_threads, monkeypatch):
    from fastddpm.cli._common import SMALL_MODEL_PARAMS, apply_threads, auto_threads

    bundled, _, _ = build.load_model(None)
    n_bundled = sum(p.numel() for p in bundled.parameters())
    cifar = 35_746_307  # the DDPM CIFAR-10 U-Net (docs/design.md, "Where things live")
    assert n_bundled < SMALL_MODEL_PARAMS < cifar
    assert auto_threads(n_bundled) == 1 and auto_threads(cifar, default=4) == 4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert apply_threads(None, n_bundled, "cpu") == 1
    torch.set_num_threads(2)
    assert apply_threads(None, n_bundled, torch.device("cuda")) == 2  # only CPU work is re-threaded
    assert apply_threads(3, n_bundled, "cpu") == 3  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert apply_threads(None, n_bundled, "cpu") == 2  # the user's OMP_NUM_THREADS is respected
    with pytest.raises(Exception, match="--threads must be a positive int"):
        apply_threads(0, n_bundled, "cpu")


def test_sample_threads_flag_and_out_suffix(tiny_run, tmp_path, capsys, keep_threads):
    from PIL import Image

    assert _sample(["--checkpoint", tiny_run, "--num", "4", "--steps", "2", "--threads", "1",
                    "--out", str(tmp_path / "g.jpg")]) == 0
    assert torch.get_num_threads() == 1
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG bytes under a .jpg name
    with Image.open(tmp_path / "g.jpg") as im:
        assert im.format == "JPEG"
    capsys.readouterr()
    assert _sample(["--checkpoint", tiny_run, "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.xyz")]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "'.xyz'" in err and ".png" in err
    assert not (tmp_path / "g.xyz").exists()


def test_ddpm_default_is_respaced_and_stated(tiny_run, tmp_path, capsys):
    from fastddpm._names import CLI_DEFAULT_STEPS
    from fastddpm.cli import build_parser
    from fastddpm.cli._common import sampler_steps

    assert CLI_DEFAULT_STEPS["ddpm"] == 100
    assert sampler_steps("ddpm", None, fd_diffusion(1000)) == 100
    assert sampler_steps("ddpm", None, fd_diffusion(50)) == 50  # never more steps than the schedule has
    assert sampler_steps("ddpm", 7, fd_diffusion(1000)) == 7
    assert _sample(["--checkpoint", tiny_run, "--sampler", "ddpm", "--num", "2", "--npz", str(tmp_path / "x.npz")]) == 0
    assert "(ddpm, 50 steps" in capsys.readouterr().out  # the tiny run's T = 50
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["sample"].format_help().split())
    assert "100 for ddpm" in text and "10x the time" in text


def fd_diffusion(T):
    import fastddpm as fd

    return fd.GaussianDiffusion(fd.NoiseSchedule.linear(num_timesteps=T))


def test_dataset_defaults_follow_the_image_size():
    import fastddpm as fd
    from fastddpm.train import TrainConfig, dataset_defaults, model_config

    # digits: the bundled model's recipe, checked against the bundled checkpoint's own config
    _, _, bundled = build.load_model(None)
    d = dataset_defaults("digits", 1, 8)
    for k in ("base_channels", "num_res_blocks", "groups", "dropout"):
        assert d[k] == bundled["model"][k], k
    assert list(d["channel_mults"]) == bundled["model"]["channel_mults"]
    assert list(d["attention_resolutions"]) == bundled["model"]["attention_resolutions"]
    for k in ("schedule", "num_timesteps", "lr", "batch_size", "ema_decay", "warmup_steps", "steps"):
        assert d[k] == bundled["train"][k], k
    # 32x32: DDPM's CIFAR-10 model (35,746,307 parameters, as diffusers' google/ddpm-cifar10-32)
    cfg = TrainConfig(**dataset_defaults("cifar", 3, 32))
    with torch.device("meta"):
        unet = fd.UNet(**model_config(cfg, 32, 3, None))
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    # sizes that halve unevenly or are large still give a valid U-Net
    for size in (28, 48, 64, 128, 256):
        cfg = TrainConfig(**dataset_defaults("x", 3, size))
        with torch.device("meta"):
            fd.UNet(**model_config(cfg, size, 3, None))


def test_train_with_the_dataset_defaults_prints_them(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--dataset", "digits", "--out-dir", str(out), "--steps", "1", "--save-every", "0",
                 "--sample-every", "0", "--no-progress", "--no-compile"]) == 0
    printed = capsys.readouterr().out
    assert "--base-channels 32*" in printed and "--channel-mults 1,2*" in printed
    assert re.search(r"--steps 1(\s|$)", printed)  # the user's flag, unmarked
    _, _, bundled = build.load_model(None)
    model = ckpt.load_checkpoint(str(out)).config["model"]
    for k in ("base_channels", "channel_mults", "attention_resolutions", "num_res_blocks", "groups"):
        assert model[k] == bundled["model"][k], k


def test_errors_name_the_flags(tmp_path, capsys):
    rc = main(["train", "--dataset", "digits", "--attention-resolutions", "16", "--out-dir", str(tmp_path / "r"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--attention-resolutions entries must be resolutions of the levels [8, 4]" in err
    assert "attention_resolutions" not in err
    from fastddpm.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "ddpm, ddim, dpm++, dpm++sde" in " ".join(text.split())


def test_checkpoint_pointing_at_a_diffusers_folder_suggests_convert(tmp_path, capsys):
    # a bare UNet2DModel folder has no schedule: convert it; a pipeline folder is read like fd.load reads it
    # (tests/test_cli_inputs.py), and a broken one is one line naming --checkpoint
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    assert _sample(["--checkpoint", str(tmp_path / "unet")]) == 1
    assert f"fastddpm convert {tmp_path / 'unet'}" in capsys.readouterr().err
    pytest.importorskip("diffusers")
    assert _sample(["--checkpoint", str(tmp_path / "pipe")]) == 1
    err = capsys.readouterr().err
    assert f"fastddpm sample: error: --checkpoint {tmp_path / 'pipe'}: cannot load the diffusers pipeline" in err


def test_convert_without_diffusers_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    assert main(["convert", str(tmp_path), str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'fastddpm convert: error: fastddpm convert needs diffusers: pip install "fastddpm[diffusers]"'


def test_eval_converts_the_reference_like_train():
    import argparse

    from fastddpm.cli.eval import reference_data
    from fastddpm.data import load_dataset
    from fastddpm.features import digits_split

    args = argparse.Namespace(part=None, image_size=16, channels=3)
    images, part = reference_data(args, "digits")
    _, heldout = digits_split(1797)
    assert part == "all" and images.shape == (len(heldout), 3, 16, 16)
    direct = load_dataset("digits", image_size=16, channels=3).batch(torch.as_tensor(heldout, dtype=torch.int64))[0]
    torch.testing.assert_close(images, direct, rtol=0, atol=0)
    assert reference_data(argparse.Namespace(part=None, image_size=None, channels=None), "digits") == ("digits", "heldout")


def test_a_clone_named_fastddpm_imports_from_its_parent_folder(tmp_path):
    """With the clone on sys.path (what `pip install -e .` now installs), Python started in the clone's
    parent finds the real package, not the clone folder as an empty namespace package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.symlink(root, tmp_path / "fastddpm")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = root  # the path entry of a path-based editable install, after the cwd
    code = "import fastddpm; print(fastddpm.__file__); fastddpm.NoiseSchedule"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(str(tmp_path / "fastddpm"), "fastddpm", "__init__.py") or \
        proc.stdout.strip() == os.path.join(root, "fastddpm", "__init__.py")


def test_eval_table_names_units_counts_and_comparability():
    from fastddpm.cli.eval import format_report

    result = {"checkpoint": "m.safetensors", "sampler": "dpm++", "steps": 20, "seed": 0, "num_samples": 100,
              "reference_count": 359, "reference": "digits:heldout", "features": "digits", "fid": 40.7029,
              "kid_mean": 0.01234, "kid_std": 0.002, "is_mean": 5.5017, "is_std": 0.5785, "precision": 0.9,
              "recall": 0.93315, "pr_k": 3, "confidence_rate": 0.95, "ref_confidence_rate": 0.958,
              "class_fraction_min": 0.03, "class_fraction_max": 0.17, "class_fractions": [0.1] * 10, "seconds": 6.5}
    text = format_report(result, "e.json")
    lines = text.splitlines()
    assert len(lines) <= 12  # a table, not a dump
    row = {ln.split("  ")[0]: ln for ln in lines}
    assert "40.70" in row["FID"] and "lower is better" in row["FID"]
    assert "0.012 +- 0.002" in row["KID"] and "not x1000" in row["KID"]
    assert "5.50 +- 0.58" in row["IS"]
    assert "0.900 / 0.933" in row["precision / recall"] and "k = 3" in row["precision / recall"]
    assert "(uniform: 0.100)" in row["class share min / max"]
    assert "100 samples vs 359 reference images" in lines[0]
    assert "same --num (100 here)" in text and text.endswith("all figures: e.json")
    assert not any(ln.startswith("KID") for ln in
                   format_report({k: v for k, v in result.items() if not k.startswith("kid")}).splitlines())
