"""fd.export_diffusers / `fastddpm export`: a folder diffusers' DDPMPipeline loads (offline) whose U-Net computes
fastddpm's outputs and whose scheduler has fastddpm's betas; convert(export(ckpt)) gives the checkpoint back."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastddpm as fd
from fastddpm._names import DISTILL_CONFIG_KEY
from fastddpm.build import load_model
from fastddpm.checkpoint import load_checkpoint, save_weights_file
from fastddpm.interop.export import ExportError, export_diffusers

diffusers = pytest.importorskip("diffusers")

SMALL = dict(image_size=8, in_channels=3, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
             attention_resolutions=(4,), dropout=0.0, groups=8)


def _checkpoint(path, schedule="linear", prediction="eps", variance="fixed_small", seed=0, clip=True, **model):
    torch.manual_seed(seed)
    kwargs = {**SMALL, **model}
    unet = fd.UNet(**kwargs)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diff = {"schedule": schedule, "num_timesteps": 1000, "prediction": prediction, "variance": variance,
            "loss": "simple", "clip_sample": clip}
    if isinstance(schedule, list):
        diff.update(schedule="custom", betas=schedule, num_timesteps=len(schedule))
    config = {"format": "fastddpm-checkpoint", "format_version": 1, "model": unet.config, "diffusion": diff}
    save_weights_file(str(path), unet.state_dict(), config)
    return str(path)


def _custom_betas(T=50):
    return torch.linspace(0.001, 0.3, T, dtype=torch.float64).pow(1.5).tolist()


CASES = {
    "add-linear-eps-small": dict(),
    "scale_shift-cosine-v-learned": dict(schedule="cosine", prediction="v", variance="learned_range",
                                         time_embedding="scale_shift", learn_sigma=True, norm_eps=1e-5,
                                         downsample_padding=1, flip_sin_to_cos=True, freq_shift=0.0),
    "add-custom-x0-large-heads": dict(schedule=_custom_betas(), prediction="x0", variance="fixed_large",
                                      head_channels=16, clip=False),
    "add-class-null-trained": dict(num_classes=3),
    "scale_shift-multihead-oneattn": dict(time_embedding="scale_shift", num_heads=2, attention_resolutions=()),
}


def _load_pipe(out):
    return diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_diffusers_with_same_outputs_and_betas(tmp_path, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = _checkpoint(tmp_path / "m.safetensors", **CASES[case])
    out = export_diffusers(ckpt, str(tmp_path / "export"))
    pipe = _load_pipe(out)
    model, diffusion, _ = load_model(ckpt, use_ema=False)
    assert type(pipe.unet).__name__ == "UNet2DModel" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 17, diffusion.num_timesteps - 1])
    kw_ours, kw_theirs = {}, {}
    if model.num_classes:
        y = torch.tensor([0, 2, 3])  # 3: the trained null class, one more diffusers label
        kw_ours, kw_theirs = {"y": y}, {"class_labels": y}
    with torch.no_grad():
        ours = model(x, t, **kw_ours)
        theirs = pipe.unet(x, t, **kw_theirs).sample
    scale = ours.abs().max()
    assert scale > 0.1  # a real output, not zeros
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * float(scale))
    # the betas to float32 rounding
    torch.testing.assert_close(pipe.scheduler.betas.to(torch.float64), diffusion.schedule.betas,
                               rtol=2.4e-7, atol=0.0)
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[diffusion.prediction]
    assert cfg.variance_type == diffusion.variance
    assert cfg.clip_sample == CASES[case].get("clip", True)


def test_export_scheduler_step_equals_fastddpm_step(tmp_path, monkeypatch):
    """The exported scheduler config drives diffusers' DDPMScheduler to fastddpm's step (learned range, v)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = _checkpoint(tmp_path / "m.safetensors", **CASES["scale_shift-cosine-v-learned"])
    pipe = _load_pipe(export_diffusers(ckpt, str(tmp_path / "export")))
    _, diffusion, _ = load_model(ckpt, use_ema=False)
    sched = pipe.scheduler
    sched.set_timesteps(10)
    ours = fd.DDPMSampler(diffusion, steps=[int(v) for v in sched.timesteps])
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    out = torch.randn(2, 6, 8, 8).clamp(-1, 1)
    t = int(sched.timesteps[3])
    theirs = sched.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # the noise DDPMScheduler drew
    mine = ours.step(out, t, x, noise=z)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_export_of_zero_null_row_gives_plain_class_table(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.safetensors", num_classes=4)
    ck = load_checkpoint(ckpt)
    ck.model["class_embedding.weight"][-1] = 0.0  # no trained null class (e.g. converted from diffusers)
    save_weights_file(ckpt, ck.model, ck.config)
    out = export_diffusers(ckpt, str(tmp_path / "e"))
    cfg = json.load(open(os.path.join(out, "unet", "config.json")))
    assert cfg["num_class_embeds"] == 4 and "fastddpm_null_class" not in cfg


@pytest.mark.parametrize("case", ["add-linear-eps-small", "scale_shift-cosine-v-learned", "add-custom-x0-large-heads",
                                  "add-class-null-trained"])
def test_round_trip_convert_of_export_gives_same_weights_and_config(tmp_path, case):
    from fastddpm.cli.convert import convert

    ckpt = _checkpoint(tmp_path / "m.safetensors", **CASES[case])
    out = export_diffusers(ckpt, str(tmp_path / "export"))
    back = convert(out, str(tmp_path / "back.safetensors"))
    a, b = load_checkpoint(ckpt), load_checkpoint(back)
    assert sorted(a.model) == sorted(b.model)
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    assert b.config["model"] == a.config["model"]
    _, da, _ = load_model(ckpt, use_ema=False)
    _, db, _ = load_model(back, use_ema=False)
    torch.testing.assert_close(db.schedule.betas, da.schedule.betas, rtol=1e-12, atol=0.0)
    assert (db.prediction, db.variance) == (da.prediction, da.variance)
    assert b.config["diffusion"]["clip_sample"] == CASES[case].get("clip", True)


def test_round_trip_of_several_heads_gives_head_channels(tmp_path):
    """diffusers stores one attention_head_dim: num_heads=2 on 64-channel blocks comes back as head_channels=32."""
    from fastddpm.cli.convert import convert

    ckpt = _checkpoint(tmp_path / "m.safetensors", **CASES["scale_shift-multihead-oneattn"])
    back = convert(export_diffusers(ckpt, str(tmp_path / "e")), str(tmp_path / "back.safetensors"))
    a, b = load_checkpoint(ckpt), load_checkpoint(back)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert (b.config["model"]["num_heads"], b.config["model"]["head_channels"]) == (1, 32)
    same = {k: v for k, v in a.config["model"].items() if k not in ("num_heads", "head_channels")}
    assert {k: b.config["model"][k] for k in same} == same


def test_refusals_name_the_setting(tmp_path):
    # two heads at attention blocks of widths 32 and 64: diffusers has one attention_head_dim
    ckpt = _checkpoint(tmp_path / "heads.safetensors", num_heads=2, attention_resolutions=(8, 4))
    with pytest.raises(ExportError, match="num_heads=2"):
        export_diffusers(ckpt, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing written
    ckpt = _checkpoint(tmp_path / "sigma.safetensors", learn_sigma=True)  # 2C outputs, fixed variance
    with pytest.raises(ExportError, match="out_channels=6"):
        export_diffusers(ckpt, str(tmp_path / "b"))


def test_out_dir_rules(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        export_diffusers(ckpt, str(busy))
    export_diffusers(ckpt, str(busy), overwrite=True)
    assert (busy / "keep.txt").read_text() == "x" and (busy / "model_index.json").is_file()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match="symbolic link"):
        export_diffusers(ckpt, str(tmp_path / "link"))
    # a link planted inside the folder is refused, its target untouched
    target = tmp_path / "victim.json"
    target.write_text("{}")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "model_index.json").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        export_diffusers(ckpt, str(tmp_path / "planted"), overwrite=True)
    assert target.read_text() == "{}"


def test_export_does_not_import_diffusers(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from fastddpm.interop.export import export_diffusers\n"
            f"export_diffusers({ckpt!r}, {str(tmp_path / 'e')!r})\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert (tmp_path / "e" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_cli_export_bundled_model(tmp_path, capsys, monkeypatch):
    from fastddpm.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "digits"
    assert main(["export", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "unipc, 10 steps" in readme  # the bundled model's tuned schedules are listed
    pipe = _load_pipe(str(out))
    model, diffusion, _ = load_model(None)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, model(x, t), rtol=1e-5, atol=1e-5)
    assert main(["export", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--overwrite", str(out)]) == 0


def test_export_from_pipeline_object(tmp_path):
    pipe = fd.load(device="cpu")
    out = fd.export_diffusers(pipe, str(tmp_path / "p"))
    cfg = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert cfg["beta_schedule"] == "squaredcos_cap_v2" and cfg["prediction_type"] == "epsilon"


def test_readme_of_a_distilled_student_says_what_diffusers_does_not_reproduce(tmp_path):
    ckpt = _checkpoint(tmp_path / "s.safetensors")
    ck = load_checkpoint(ckpt)
    # a student set as `fastddpm distill` writes it: one U-Net per K under students.<K>.
    entry = {"teacher": "runs/cifar", "calls": {"2": [999, 499], "4": [999, 749, 499, 249]},
             "prediction": {"2": ["x0", "eps"], "4": ["x0", "eps", "eps", "eps"]}}
    student4 = {k: v + 0.01 for k, v in ck.model.items()}
    weights = {**{f"students.2.{k}": v for k, v in ck.model.items()},
               **{f"students.4.{k}": v for k, v in student4.items()}}
    save_weights_file(ckpt, weights, {**ck.config, DISTILL_CONFIG_KEY: entry})
    out = export_diffusers(ckpt, str(tmp_path / "e"))
    readme = open(os.path.join(out, "README.md")).read()
    assert "4-call distilled student" in readme and '"teacher": "runs/cifar"' in readme
    # the exported U-Net is the set's 4-call student
    from safetensors.torch import load_file

    exported = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    teacher_export = load_file(os.path.join(export_diffusers(_checkpoint(tmp_path / "t.safetensors"),
                                                             str(tmp_path / "t")), "unet",
                                            "diffusion_pytorch_model.safetensors"))
    key = next(k for k, v in teacher_export.items() if v.is_floating_point() and v.numel() > 1)
    torch.testing.assert_close(exported[key], teacher_export[key] + 0.01)
    plain = open(os.path.join(export_diffusers(_checkpoint(tmp_path / "p.safetensors"), str(tmp_path / "f")),
                              "README.md")).read()
    assert "student" not in plain


def test_cli_export_no_ema_writes_the_raw_weights(tmp_path, monkeypatch):
    """`--no-ema` (the flag of sample / eval / tune-steps / inpaint) exports the raw weights, the default the EMA."""
    from fastddpm.checkpoint import save_checkpoint
    from fastddpm.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = load_checkpoint(_checkpoint(tmp_path / "m.safetensors"))
    raw = ck.model
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.items()}
    run = tmp_path / "run"
    save_checkpoint(str(run), 1, ck.config, raw, ema)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 600])
    outs = {}
    for flags in ([], ["--no-ema"]):
        out = tmp_path / ("raw" if flags else "ema")
        assert main(["export", "--checkpoint", str(run), *flags, str(out)]) == 0
        with torch.no_grad():
            outs[bool(flags)] = _load_pipe(str(out)).unet(x, t).sample
    for no_ema, want in ((False, True), (True, False)):
        model = load_model(str(run), use_ema=want)[0]
        with torch.no_grad():
            torch.testing.assert_close(outs[no_ema], model(x, t), rtol=1e-5, atol=1e-5)
    assert (outs[True] - outs[False]).abs().max() > 1e-3
