"""Hand-made or hostile files (configs, safetensors metadata, train --config, schedules.json) are refused
with one line naming the file and the entry: no RecursionError, no int-conversion limit, no TypeError."""
import json
import os

import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm import tune as ft
from fastddpm.cli import main
from fastddpm.jsonio import JSONInputError, loads

DEEP = "[" * 5000 + "]" * 5000
HUGE_INT = "1" * 5000


@pytest.mark.parametrize("text,match", [
    (DEEP, r"X: JSON nested 5000 levels deep \(at most 32"),
    ('{"a": ' + HUGE_INT + "}", r"X: an integer of 5000 digits \(at most 40"),
    ('{"a": ', r"X: truncated or invalid JSON"),
])
def test_jsonio_refuses_deep_huge_and_truncated(text, match):
    with pytest.raises(JSONInputError, match=match):
        loads(text, "X")
    assert loads('{"a": "[[[[{{", "b": [1, [2]]}', "X") == {"a": "[[[[{{", "b": [1, [2]]}  # strings are skipped


def _tiny_model():
    from fastddpm.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), groups=4, dropout=0.0)
    return net, {"model": json.loads(json.dumps(net.config)), "diffusion": {"schedule": "cosine", "num_timesteps": 50}}


def _weights_file(tmp_path, edit=None, raw_meta=None):
    net, cfg = _tiny_model()
    if edit:
        edit(cfg)
    path = str(tmp_path / "m.safetensors")
    ckpt.save_weights_file(path, net.state_dict(), cfg)
    if raw_meta is not None:  # rewrite the metadata as given text
        from safetensors.torch import load_file, save_file

        save_file(load_file(path), path, metadata={ckpt.META_KEY: raw_meta})
    return path


@pytest.mark.parametrize("raw,match", [
    (DEEP, r"m\.safetensors \(metadata\): JSON nested 5000 levels deep"),
    ('{"model": {"image_size": ' + HUGE_INT + '}, "diffusion": {}}', r"m\.safetensors \(metadata\): an integer of 5000"),
])
def test_safetensors_metadata_deep_or_huge_is_one_line(tmp_path, capsys, raw, match):
    path = _weights_file(tmp_path, raw_meta=raw)
    with pytest.raises(ckpt.CheckpointError, match=match):
        build.load_model(path)
    assert main(["sample", "--checkpoint", path, "--npz", str(tmp_path / "a.npz"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm sample: error: ") and err.count("\n") == 1


def test_checkpoint_dir_config_json_deep_is_one_line(tmp_path, capsys):
    path = _weights_file(tmp_path)
    d = tmp_path / "ck"
    d.mkdir()
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), str(d / "model.safetensors"))
    (d / "config.json").write_text(DEEP)
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json: JSON nested 5000 levels deep"):
        build.load_model(str(d), use_ema=False)


@pytest.mark.parametrize("key,value,match", [
    ("num_res_blocks", [1], r"num_res_blocks must be an int >= 1, got \[1\]"),
    ("channel_mults", "12", r"channel_mults must be a non-empty sequence of positive ints, got '12'"),
])
def test_wrong_types_in_checkpoint_config_are_one_line(tmp_path, capsys, key, value, match):
    path = _weights_file(tmp_path, edit=lambda c: c["model"].update({key: value}))
    with pytest.raises(ckpt.CheckpointError, match=match):
        build.load_model(path)


TINY = {"dataset": "digits", "base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": [4],
        "num_res_blocks": 1, "groups": 4, "num_timesteps": 50, "batch_size": 8, "warmup_steps": 2,
        "progress": False, "compile": False, "steps": 1, "save_every": 0, "sample_every": 0}


@pytest.mark.parametrize("entry,value,match", [
    ("channel_mults", "12", "--channel-mults must be a list of ints, got \"12\""),
    ("num_res_blocks", [1], r"--num-res-blocks must be an int, got \[1\]"),
    ("attention_resolutions", 4, "--attention-resolutions must be a list of ints, got 4"),
    ("random_flip", "yes", "--random-flip must be true or false, got \"yes\""),
    ("batch_size", 8.5, "--batch-size must be an int, got 8.5"),
    ("seed", None, "seed must be an int, got null"),
])
def test_train_config_file_wrong_types_name_file_and_entry(tmp_path, capsys, entry, value, match):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**TINY, entry: value, "out_dir": str(tmp_path / "r")}))
    assert main(["train", "--config", str(p)]) == 1
    err = capsys.readouterr().err
    assert err == f"fastddpm train: error: --config {p}: {match.replace(chr(92), '')}\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text,match", [(DEEP, "JSON nested 5000 levels deep"),
                                        ('{"steps": ' + HUGE_INT + "}", "an integer of 5000 digits")])
def test_train_config_file_deep_or_huge(tmp_path, capsys, text, match):
    p = tmp_path / "c.json"
    p.write_text(text)
    assert main(["train", "--config", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm train: error: --config {p}: {match}") and err.count("\n") == 1


# ------------------------------------------------------------------------------ schedules.json
def _schedules(tmp_path, schedules):
    path = _weights_file(tmp_path)
    side = tmp_path / "m.schedules.json"
    side.write_text(json.dumps({"format": ft.SCHEDULES_FORMAT, "version": 1, "schedules": schedules}))
    return path, str(side)


@pytest.mark.parametrize("schedules,match", [
    ({"ddim": {"10": {"timesteps": [40, 0]}}}, r"schedules\['ddim'\]\['10'\]: holds 2 timesteps for 10 steps"),
    ({"ddim": {"2": {"timesteps": [40.5, 0]}}}, r"schedules\['ddim'\]\['2'\]: must be an object whose 'timesteps' is a "
                                                r"list of ints"),
    ({"ddim": {"2": {}}}, r"'timesteps' is a list of ints"),
    ({"ddim": {"2": [40, 0]}}, r"'timesteps' is a list of ints"),
    ({"ddim": 3}, r"schedules\['ddim'\] must be an object"),
    ({"ddim": {"2": {"timesteps": [0, 40]}}}, r"distinct, descending and >= 0"),
    ({"ddim": {"x": {"timesteps": [0]}}}, r"the key must be a positive step count, got 'x'"),
])
def test_hand_made_schedules_json_is_refused_naming_it(tmp_path, capsys, schedules, match):
    path, side = _schedules(tmp_path, schedules)
    with pytest.raises(ValueError, match=match):
        ft.load_tuned_schedules(path)
    assert main(["sample", "--checkpoint", path, "--sampler", "ddim", "--steps", "2", "--npz",
                 str(tmp_path / "a.npz"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm sample: error: {side}: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "a.npz")


def test_schedule_beyond_the_model_names_the_file(tmp_path, capsys):
    path, side = _schedules(tmp_path, {"ddim": {"2": {"timesteps": [70, 0]}}})  # the model has T = 50
    assert main(["sample", "--checkpoint", path, "--sampler", "ddim", "--steps", "2", "--npz",
                 str(tmp_path / "a.npz"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm sample: error: {side}: ") and "timestep 70, beyond this model's 50" in err
