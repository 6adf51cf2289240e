"""fastddpm.checkpoint: atomic saves (a crash mid-write keeps the previous checkpoint), listing and
pruning, and one-line errors for missing, truncated or corrupt files. Checkpoints of a trained run
(architecture checks, export) are tested with training in tests/test_train.py; checksums and resume in
tests/test_resume.py; refusing malicious files in tests/test_security.py; the atomic file writes
underneath in tests/test_fileio.py."""
import os

import pytest
import torch

from fastddpm import checkpoint as ckpt


def _tiny_state(v=0.0):
    return {"a.weight": torch.full((3, 2), v), "b.bias": torch.arange(4.0) + v}


def _tiny_cfg():
    return {"model": {"image_size": 8}, "diffusion": {"schedule": "linear", "num_timesteps": 10}}


def test_checkpoint_crash_mid_write_keeps_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _tiny_cfg(), _tiny_state(1.0), _tiny_state(1.5), {"step": 1})
    calls = []

    def failing_write(path, data):
        calls.append(os.path.basename(path))
        if path.endswith("model.safetensors"):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # half written, then the "crash"
            raise OSError("disk on fire")
        with open(path, "wb") as f:
            f.write(data)

    with pytest.raises(OSError, match="disk on fire"):
        ckpt.save_checkpoint(tmp_path, 2, _tiny_cfg(), _tiny_state(2.0), _tiny_state(2.5), {"step": 2},
                             _write=failing_write)
    assert "model.safetensors" in calls
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000001"]  # temp dir cleaned up
    ck = ckpt.load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.model["a.weight"], torch.full((3, 2), 1.0))
    assert torch.equal(ck.ema["b.bias"], torch.arange(4.0) + 1.5) and ck.state == {"step": 1}

    # a hard crash leaves a hidden temp dir: it is ignored, then cleaned by the next save
    os.makedirs(tmp_path / "checkpoints" / ".step_00000002.tmp-dead")
    assert ckpt.latest_checkpoint(tmp_path).endswith("step_00000001")
    for s in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, s, _tiny_cfg(), _tiny_state(s), None, {"step": s}, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000003", "step_00000004"]


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints/step_"):
        ckpt.load_checkpoint(str(tmp_path))
    d = ckpt.save_checkpoint(tmp_path, 7, _tiny_cfg(), _tiny_state(), _tiny_state(), {"step": 7})
    # truncated weights
    mp = os.path.join(d, "model.safetensors")
    data = open(mp, "rb").read()
    open(mp, "wb").write(data[:-5])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        ckpt.load_checkpoint(d, load_state=False, load_ema=False)
    open(mp, "wb").write(data)
    # truncated training state
    sp = os.path.join(d, "state.pt")
    open(sp, "wb").write(open(sp, "rb").read()[:20])
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: truncated or corrupt"):
        ckpt.load_checkpoint(d)
    os.remove(sp)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: missing"):
        ckpt.load_checkpoint(d)
    # truncated config
    cp = os.path.join(d, "config.json")
    open(cp, "w").write('{"model": {"image_s')
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json: truncated or invalid config JSON"):
        ckpt.load_checkpoint(d, load_state=False)
