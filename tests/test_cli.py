"""The fastddpm CLI: train and sample end to end on tiny checkpoints, sharded sampling, error messages."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastddpm import checkpoint as ckpt
from fastddpm.cli import main

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

    assert not (out / "samples" / "step_00000002.png").exists()  # step 2 was done before the resume
    with Image.open(out / "samples" / "step_00000004.png") as im:  # 2x2 grid of 8x8 tiles, scale 64 // 8
        assert im.size == ((1 + 2 * 9) * 8, (1 + 2 * 9) * 8)
    with pytest.raises(SystemExit) as e:
        main(["train", "--schedule", "quadratic"])
    assert e.value.code == 2


def test_sample_png_and_npz_match_the_sampler(tiny_run, tmp_path):
    from PIL import Image

    from fastddpm.data import to_uint8
    from fastddpm.samplers import DDIMSampler

    png, npz = tmp_path / "g.png", tmp_path / "x.npz"
    assert _sample(["--checkpoint", tiny_run, "--sampler", "ddim", "--steps", "3", "--num", "5", "--batch-size", "2",
                    "--seed", "7", "--out", str(png), "--npz", str(npz)]) == 0
    images = np.load(npz)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    model, diff, _ = ckpt.load_model(tiny_run)
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
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(argv) == 0


def test_sample_sharded_over_two_processes_matches_one(tiny_run, tmp_path):
    import torch.multiprocessing as mp

    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["sample", "--no-progress", "--checkpoint", tiny_run, "--steps", "2", "--num", "5", "--batch-size", "2"]
    assert main([*args, "--npz", str(one)]) == 0
    mp.start_processes(_sample_worker, args=(2, _free_port(), [*args, "--npz", str(two), "--out", str(tmp_path / "g.png")]),
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
