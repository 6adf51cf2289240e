"""Nothing a user made is lost or overwritten by `fastddpm train`: Ctrl-C / SIGTERM save the current step,
resume never switches runs or drops a log silently, a run directory that holds a run is not overwritten
without asking, an abandoned branch's checkpoints are set aside, and no file is written through a link."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fastddpm import checkpoint as ckpt
from fastddpm.cli import main
from fastddpm.run_files import SUPERSEDED_DIR, SUPERSEDED_LOG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "4",
              "--num-res-blocks", "1", "--groups", "4", "--num-timesteps", "50", "--batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", "2", "--no-progress", "--no-compile", "--log-every", "1", "--ema-decay", "0.9",
              "--sample-every", "0", "--threads", "1"]


def _log_steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run of 6 steps on the digits with checkpoints at 2, 4 and 6 (a pristine copy: copy before use)."""
    d = tmp_path_factory.mktemp("six") / "run"
    assert main(["train", "--dataset", "digits", *TINY_FLAGS, "--steps", "6", "--save-every", "2", "--keep", "0",
                 "--dropout", "0.1", "--out-dir", str(d)]) == 0
    return d


def _copy(run, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(run, out, symlinks=True)
    return out


# ------------------------------------------------------------------------------ Ctrl-C and SIGTERM
def _start(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "fastddpm", "train", "--dataset", "digits", *TINY_FLAGS,
                             "--steps", "100000", "--save-every", "0", "--out-dir", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(proc, log, n, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if os.path.exists(log) and len(open(log).read().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_the_current_step_and_says_where(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_steps(proc, out / "log.jsonl", 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    steps = ckpt.list_checkpoints(str(out))
    assert len(steps) == 1, err
    step, path = steps[0]
    assert step >= 3 and _log_steps(out / "log.jsonl")[-1] == step  # the log holds exactly the saved steps
    assert f"fastddpm train: interrupted at step {step}: saved {path}; continue with --resume" in err, err
    assert "Traceback" not in err
    ck = ckpt.load_checkpoint(path)  # a complete checkpoint: every checksum holds
    assert ck.step == step and ck.state["step"] == step
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]  # no temporary leftovers


def test_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_steps(proc, out / "log.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    for _, p in ckpt.list_checkpoints(str(out)):  # whatever was saved is complete
        ckpt.load_checkpoint(p)
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")] if (out / "checkpoints").exists() \
        else True


# ------------------------------------------------------------------------------ resume without a checkpoint
def _npz_dataset(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, images=rng.integers(0, 256, size=(32, 8, 8, 1), dtype=np.uint8))
    return path


def test_resume_without_checkpoint_uses_the_saved_settings_and_keeps_the_log(tmp_path, capsys):
    data = _npz_dataset(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(data), *TINY_FLAGS, "--dropout", "0.1", "--steps", "3",
                 "--save-every", "0", "--out-dir", str(out)]) == 0
    shutil.rmtree(out / "checkpoints")  # as a run killed before its first checkpoint
    saved = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert f"no checkpoint in {out}: starting from step 0 with the settings of {out / 'config.json'}" in err
    now = json.loads((out / "config.json").read_text())
    for k in ("dataset", "base_channels", "dropout", "channel_mults", "num_timesteps"):
        assert now["train"][k] == saved["train"][k], k
    assert now["train"]["dataset"] == str(data) and now["model"]["dropout"] == 0.1
    assert _log_steps(out / "log.jsonl") == [1, 2]
    assert _log_steps(out / SUPERSEDED_LOG) == [1, 2, 3]  # the first attempt's lines, kept
    assert f"3 log lines past step 0 moved to {out / SUPERSEDED_LOG}" in err


def test_resume_without_checkpoint_or_config_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["train", "--dataset", "digits", *TINY_FLAGS, "--steps", "1", "--out-dir", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm train: error: --resume: {out} holds no checkpoint and no config.json")
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


# ------------------------------------------------------------------------------ a run directory holding a run
def test_fresh_run_in_a_run_directory_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}\n')
    (out / "log.jsonl").write_text('{"step": 1}\n' * 144)
    assert main(["train", "--dataset", "digits", *TINY_FLAGS, "--steps", "1", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"fastddpm train: error: --out-dir {out} already holds a run (config.json, log.jsonl); pass "
                   "resume=True (--resume) to continue it, overwrite=True (--overwrite) to replace it, or choose "
                   "another --out-dir\n")
    assert (out / "config.json").read_text() == '{"mine": 1}\n' and len(_log_steps(out / "log.jsonl")) == 144
    assert main(["train", "--dataset", "digits", *TINY_FLAGS, "--steps", "1", "--out-dir", str(out),
                 "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"--overwrite: removed the previous run's config.json, log.jsonl from {out}" in err
    assert _log_steps(out / "log.jsonl") == [1] and "train" in json.loads((out / "config.json").read_text())


# ------------------------------------------------------------------------------ resuming an older checkpoint
def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(six_steps, tmp_path, capsys):
    out = _copy(six_steps, tmp_path)
    old = out / "checkpoints" / "step_00000002"
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", str(old), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    aside = [d for d in os.listdir(out / SUPERSEDED_DIR)]
    assert len(aside) == 1
    dest = out / SUPERSEDED_DIR / aside[0]
    assert sorted(os.listdir(dest)) == ["step_00000004", "step_00000006"]
    assert f"resuming from step 2: the newer checkpoints step_00000004, step_00000006 moved to {dest}" in err
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 3]
    assert _log_steps(out / "log.jsonl") == [1, 2, 3] and _log_steps(out / SUPERSEDED_LOG) == [3, 4, 5, 6]
    # a later plain --resume continues this branch, not the abandoned one
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "4"]) == 0
    assert "resuming from step 3" in capsys.readouterr().err
    assert _log_steps(out / "log.jsonl") == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ links
@pytest.mark.parametrize("name", ["train.lock", "config.json", "log.jsonl"])
def test_no_file_is_written_through_a_symlink(six_steps, tmp_path, capsys, name):
    out = _copy(six_steps, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = out / name
    if target.exists():
        target.unlink()
    os.symlink(victim, target)
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm train: error: {target} is a symbolic link (to {victim})"), err
    assert victim.read_text() == "precious\n" and os.path.islink(target)
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 4, 6]


def test_lock_file_with_another_hard_link_is_refused(six_steps, tmp_path, capsys):
    out = _copy(six_steps, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if (out / "train.lock").exists():
        (out / "train.lock").unlink()
    os.link(victim, out / "train.lock")
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "7"]) == 1
    assert "train.lock has other hard links" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
    from fastddpm import run_files

    calls = []
    orig = run_files.write_owned_json
    monkeypatch.setattr(run_files, "write_owned_json", lambda p, o, *a, **k: (calls.append(p), orig(p, o, *a, **k)))
    assert main(["train", "--dataset", "digits", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tmp_path / "r")]) == 0
    assert str(tmp_path / "r" / "config.json") in calls
