"""`fastddpm convert`: a saved diffusers pipeline becomes a checkpoint that samples like diffusers."""
import pytest
import torch

from fastddpm.build import load_model
from fastddpm.cli.convert import convert

diffusers = pytest.importorskip("diffusers")


def _save_pipeline(path, **unet_kwargs):
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               layers_per_block=1, norm_num_groups=8)
    cfg.update(unet_kwargs)
    unet = diffusers.UNet2DModel(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return unet.eval(), sched


def test_convert_pipeline_roundtrip(tmp_path):
    unet, sched = _save_pipeline(tmp_path / "pipe")
    out = convert(str(tmp_path / "pipe"), str(tmp_path / "model.safetensors"))
    model, diff, _ = load_model(out, use_ema=False)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)
    assert diff.prediction == "v"
    torch.testing.assert_close(diff.schedule.alphas_cumprod.float(), sched.alphas_cumprod, rtol=2e-5, atol=1e-6)


def test_convert_unmappable_config_names_option(tmp_path):
    _save_pipeline(tmp_path / "pipe", act_fn="gelu")
    with pytest.raises(ValueError, match="act_fn"):
        convert(str(tmp_path / "pipe"), str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        convert(str(tmp_path / "pipe"), str(tmp_path / "m.pt"))


def test_convert_command_line(tmp_path, capsys):
    from fastddpm.cli import main

    _save_pipeline(tmp_path / "pipe")
    assert main(["convert", str(tmp_path / "pipe"), str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").stat().st_size > 0
    assert main(["sample", "--checkpoint", str(tmp_path / "m.safetensors"), "--num", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    assert (tmp_path / "s.png").exists()


def test_convert_bare_unet_folder_with_schedule_flags(tmp_path, capsys):
    from fastddpm.cli import main

    unet, _ = _save_pipeline(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "bare")  # config.json + weights, no scheduler
    out = str(tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "bare"), out]) == 1
    err = capsys.readouterr().err
    assert "--beta-schedule linear" in err and "no noise schedule" in err
    assert main(["convert", str(tmp_path / "bare"), out, "--beta-schedule", "linear", "--num-train-timesteps", "200",
                 "--prediction-type", "v_prediction"]) == 0
    captured = capsys.readouterr()
    assert "accelerate" not in captured.err + captured.out  # diffusers' low_cpu_mem_usage warning is not shown
    model, diff, _ = load_model(out, use_ema=False)
    # DDPMScheduler's linear betas: linspace(beta_start, beta_end, T) with its defaults 1e-4 and 0.02
    torch.testing.assert_close(diff.schedule.betas, torch.linspace(1e-4, 0.02, 200, dtype=torch.float64))
    assert diff.prediction == "v"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 150])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)
