"""Resume does what users mean; runs cannot collide; checkpoints cannot rot silently; DDP faults end cleanly."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm.cli import main
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.run_dir import RunLock as _RunLock
from fastddpm.run_dir import resume_message as _resume_message
from fastddpm.train import RunLockError, TrainConfig, train
from ddp_helpers import as_rank, free_port

TINY_FLAGS = ["--dataset", "digits", "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "4",
              "--num-res-blocks", "1", "--groups", "4", "--num-timesteps", "50", "--batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", "2", "--no-progress", "--no-compile", "--log-every", "1", "--ema-decay", "0.9"]
TINY = dict(dataset="digits", base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,), num_res_blocks=1,
            groups=4, num_timesteps=50, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, progress=False,
            ema_decay=0.9, compile=False)


def _cfg(out_dir, **kw):
    return TrainConfig(out_dir=str(out_dir), **{**TINY, **kw})


def _log_steps(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A CLI run of 4 steps with checkpoints at 2 and 4 (kept in a pristine copy)."""
    d = tmp_path_factory.mktemp("four") / "run"
    assert main(["train", *TINY_FLAGS, "--steps", "4", "--save-every", "2", "--keep", "0", "--out-dir", str(d)]) == 0
    return str(d)


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ------------------------------------------------------------------------------ resume
def test_resume_without_flags_continues_the_saved_run(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path)
    final = ckpt.load_checkpoint(str(out))
    shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if killed after the checkpoint of step 2
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from step 2 ({out / 'checkpoints' / 'step_00000002'})" in err
    changed = [line.split(":")[0].strip() for line in err.splitlines() if " -> " in line]
    assert changed == ["out_dir"]  # only the run's folder (copied here) differs from the saved settings
    again = ckpt.load_checkpoint(str(out))
    same = lambda c: {k: v for k, v in c["train"].items() if k not in ("out_dir", "resume")}  # noqa: E731
    assert again.step == 4 and same(again.config) == same(final.config)
    for k, v in final.model.items():  # the saved configuration, continued bit for bit
        assert torch.equal(again.model[k], v), k
    assert _log_steps(out) == [1, 2, 3, 4]  # the log was cut at step 2, not duplicated


def test_resume_flags_override_and_are_reported(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path)
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "5", "--lr", "5e-4"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 4" in err and "  lr: 0.001 -> 0.0005" in err and "  steps: 4 -> 5" in err
    ck = ckpt.load_checkpoint(str(out))
    assert ck.step == 5 and ck.config["train"]["lr"] == 5e-4 and ck.config["model"]["base_channels"] == 8
    # a change of the model or the diffusion is refused, naming the settings
    assert main(["train", "--out-dir", str(out), "--resume", "--base-channels", "16", "--num-timesteps", "60"]) == 1
    err = capsys.readouterr().err
    assert "--base-channels: 8 -> 16" in err and "--num-timesteps: 50 -> 60" in err and err.count("\n") == 1
    # dropout changes no weight: allowed, and recorded in the new checkpoint
    old = ckpt.load_checkpoint(str(out)).config["model"]["dropout"]  # the dataset's default (digits: 0)
    assert main(["train", "--out-dir", str(out), "--resume", "--steps", "6", "--dropout", "0.25"]) == 0
    assert f"  dropout: {old} -> 0.25" in capsys.readouterr().err
    assert ckpt.load_checkpoint(str(out)).config["model"]["dropout"] == 0.25
    # a finished run says there is nothing to do
    assert main(["train", "--out-dir", str(out), "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().err


def test_resume_reports_a_world_size_change():
    cfg = _cfg("r", batch_size=128)
    msg = _resume_message("P", 7, cfg.to_dict(), cfg, saved_world=2, world=1)
    assert msg.splitlines()[0] == "fastddpm train: resuming from step 7 (P)"
    assert "world size: 2 -> 1 processes" in msg and "batch_size=128" in msg and "(64 -> 128 per process)" in msg


class _CrashAt:
    def __init__(self, monkeypatch, step):
        orig, calls = GaussianDiffusion.training_losses, [0]

        def patched(self_, *a, **k):
            calls[0] += 1
            if calls[0] == step:
                raise RuntimeError("simulated crash")
            return orig(self_, *a, **k)

        monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)


def test_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _CrashAt(m, 6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(_cfg(out, steps=8, save_every=100))
    assert _log_steps(out) == [1, 2, 3, 4, 5] and ckpt.latest_checkpoint(str(out)) is None
    assert main(["train", *TINY_FLAGS, "--steps", "3", "--out-dir", str(out), "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert _log_steps(out) == [1, 2, 3]  # the dead run's lines are gone


def test_corrupt_latest_checkpoint_names_the_older_one(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path)
    mp = out / "checkpoints" / "step_00000004" / "model.safetensors"
    mp.write_bytes(mp.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError) as e:
        train(_cfg(out, steps=5, resume=True))
    msg = str(e.value)
    assert "step_00000004/model.safetensors: truncated or corrupt" in msg
    assert "newest older checkpoint that loads is" in msg and "step_00000002 (step 2)" in msg
    assert "--resume-fallback" in msg
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--resume-fallback"]) == 0
    err = capsys.readouterr().err
    assert "falling back to the newest checkpoint that loads" in err and "resuming from step 2" in err
    assert ckpt.load_checkpoint(str(out)).step == 4


# ------------------------------------------------------------------------------ checksums
def _flip_tensor_byte(path):
    data = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0xFF  # inside the tensor data, the header stays valid
    open(path, "wb").write(bytes(data))


def test_checksums_detect_flipped_bytes(four_steps, tmp_path):
    out = _copy(four_steps, tmp_path)
    d = out / "checkpoints" / "step_00000004"
    if shutil.which("sha256sum"):  # the file is sha256sum's format: the tool agrees with it
        assert subprocess.run(["sha256sum", "-c", "--quiet", ckpt.CHECKSUMS_FILE], cwd=d).returncode == 0
    ckpt.verify_checkpoint(str(d))
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        backup = (d / name).read_bytes()
        if name == "state.pt":
            data = bytearray(backup)
            data[len(data) // 2] ^= 0x01
            (d / name).write_bytes(bytes(data))
        else:
            _flip_tensor_byte(d / name)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}: (SHA-256 mismatch|truncated or corrupt)"):
            ckpt.load_checkpoint(str(d))
        (d / name).write_bytes(backup)
    # an edited config.json only warns (people edit it; the config checks judge what it says)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, note="edited")))
    with pytest.warns(UserWarning, match=r"config\.json was edited after it was written"):
        assert ckpt.load_checkpoint(str(d)).config["note"] == "edited"
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json: SHA-256 mismatch"):
        ckpt.verify_checkpoint(str(d))
    _flip_tensor_byte(d / "ema.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"ema\.safetensors: SHA-256 mismatch"):
        build.load_model(str(d))
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004/ema\.safetensors: SHA-256 mismatch"):
        train(_cfg(out, steps=6, resume=True))


# ------------------------------------------------------------------------------ run lock
def test_second_process_on_the_same_run_refuses(tmp_path):
    out = tmp_path / "run"
    lock = _RunLock(str(out))  # a live owner (this process, through another open file)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another training process \(pid {os.getpid()} on "
                                               rf"{socket.gethostname()}"):
            train(_cfg(out, steps=1))
        assert main(["train", *TINY_FLAGS, "--steps", "1", "--out-dir", str(out)]) == 1
    finally:
        lock.release()
    assert ckpt.latest_checkpoint(str(out)) is None
    train(_cfg(out, steps=1))  # released: the run starts
    assert open(out / "train.lock").read() == ""  # and it released the lock when it ended


def test_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    train(_cfg(out, steps=1))
    assert f"taking over the stale lock {out / 'train.lock'} of pid {dead.pid}" in capsys.readouterr().err


def test_lock_without_flock_uses_the_pid_record(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*a):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RunLockError, match=rf"pid {os.getppid()}"):
        _RunLock(str(out))
    (out / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": "another-host"}))
    with pytest.raises(RunLockError, match="another-host"):
        _RunLock(str(out))


# ------------------------------------------------------------------------------ DDP faults (2 gloo processes)
def _fault_worker(rank, world, port, out_dir, result_dir, fault):
    import time

    as_rank(rank, world, port)
    orig, calls = GaussianDiffusion.training_losses, [0]

    def patched(self_, *a, **k):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            if fault == "crash":
                raise RuntimeError("simulated crash on rank 1")
            time.sleep(7)  # stalled longer than ddp_timeout (+ the 0.5 s check-in window)
        return orig(self_, *a, **k)

    GaussianDiffusion.training_losses = patched
    try:
        # a crash needs no timeout (the peer's socket closes); a stall is seen after ddp_timeout, which
        # must still leave room for a loaded machine's start-up skew between the ranks
        train(_cfg(out_dir, steps=4, save_every=0, ddp_timeout=60.0 if fault == "crash" else 5.0))
        msg = "finished"
    except Exception as e:  # noqa: BLE001  (the test inspects what each rank raised)
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


@pytest.mark.slow  # two training processes
@pytest.mark.parametrize("fault", ["crash", "stall"])
def test_ddp_peer_failure_ends_every_rank_with_one_line(tmp_path, fault):
    import torch.multiprocessing as mp

    res = tmp_path / "res"
    res.mkdir()
    ctx = mp.start_processes(_fault_worker, args=(2, free_port(), str(tmp_path / "run"), str(res), fault),
                             nprocs=2, join=False, start_method="fork")
    assert ctx.join(timeout=60) or ctx.join(timeout=30), "the ranks did not end"
    r0, r1 = ((res / f"rank{i}.txt").read_text() for i in (0, 1))
    assert r0.startswith("DistributedError: rank 0: stopping") and "\n" not in r0
    if fault == "crash":
        assert "rank 1 failed: RuntimeError: simulated crash on rank 1" in r0
        assert r1 == "RuntimeError: simulated crash on rank 1"
    else:
        assert "rank 1 stopped responding" in r0 and "ddp_timeout=5 s" in r0
        assert r1.startswith("DistributedError: rank 1: stopping")
