"""Distillation (fastddpm.distillation): oracles from closed forms and from the teacher itself.

* exact Gaussian data: the probability-flow ODE map x_T -> x_0 is x_0 = x_T * std_0 / std_T; a 1-call
  linear student of the exact denoiser, trained through `train_step`, converges to that gain;
* a student whose K and timesteps are the teacher's own DDIM reproduces the teacher at init (loss 0),
  for eps / x0 / v, linear / cosine, learned-range and class-conditional (guided) teachers;
* the differentiable chain is the sampler: `ddim_chain` = `DDIMSampler.sample` = FastSampler;
* resume is exact; bad inputs are named; students load through fd.load, FastSampler.from_checkpoint and
  `fastddpm sample`, and a K they do not hold is refused naming the counts they have.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import fastddpm as fd
from fastddpm import build
from fastddpm import checkpoint as ck
from fastddpm.distillation import (DistillConfig, ddim_chain, distill, student_sampler, student_timesteps, teacher_pairs,
                              train_step)
from fastddpm.ops.philox import philox_normal
from fastddpm.samplers import make_sampler
from fastddpm.student import StudentSet, student_for
from fastddpm.unet import UNet
from ddp_helpers import as_rank, free_port

TINY_MODEL = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=[1], num_res_blocks=1,
                  attention_resolutions=[], dropout=0.0, num_heads=1, groups=4)
TINY_DIFFUSION = dict(schedule="linear", num_timesteps=40, prediction="eps", variance="fixed_small", loss="simple")


def _tiny_checkpoint(path, model=None, diffusion=None, seed=0):
    model = dict(TINY_MODEL, **(model or {}))
    torch.manual_seed(seed)
    u = UNet(**model)
    with torch.no_grad():
        for p in u.parameters():  # the output conv is zero-initialised: make the model do something
            p.add_(0.05 * torch.randn_like(p))
    cfg = {"model": model, "diffusion": dict(TINY_DIFFUSION, **(diffusion or {}))}
    return ck.save_checkpoint(str(path), 1, cfg, u.state_dict(), u.state_dict())


def _x_T(seed, shape, offset=0):
    return philox_normal(torch.tensor([seed]), shape, torch.zeros(1, dtype=torch.int64), stream=1, image_offset=offset)


# ----------------------------------------------------------------------------- the chain is the sampler
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_chain_equals_sampler_and_fastsampler(tmp_path, prediction):
    path = _tiny_checkpoint(tmp_path, diffusion={"prediction": prediction})
    model, diff, _ = build.load_model(path)
    for k in (1, 3):
        smp = student_sampler(diff, student_timesteps(diff, k))
        ref = smp.sample(model, (5, 1, 8, 8), seed=4)
        with torch.no_grad():
            got = ddim_chain(model, smp, _x_T(4, (5, 1, 8, 8)))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        # FastSampler's in-place op orders the fp32 update differently: fp32 rounding, amplified by 1 / sqrt(ab)
        torch.testing.assert_close(fd.FastSampler(model, smp, 5)(seed=4), ref, rtol=2e-5, atol=2e-5)


def test_mixed_prediction_table_is_ddim_with_each_steps_output_type(tmp_path):
    model, diff, _ = build.load_model(_tiny_checkpoint(tmp_path))
    ts, preds = [39, 25, 10], ["x0", "eps", "v"]
    smp = student_sampler(diff, ts, preds)
    got = smp.sample(model, (3, 1, 8, 8), seed=1)
    ab = diff.schedule.alphas_cumprod  # float64 reference, the DDIM update written out
    x = _x_T(1, (3, 1, 8, 8)).double()
    for s, (t, p) in enumerate(zip(ts, preds)):
        with torch.no_grad():
            m = model(x.float(), torch.full((3,), t)).double()
        a, a_prev = ab[t], (ab[ts[s + 1]] if s + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        if p == "x0":
            x0, eps = m, (x - a.sqrt() * m) / (1 - a).sqrt()
        elif p == "eps":
            x0, eps = (x - (1 - a).sqrt() * m) / a.sqrt(), m
        else:
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * m, (1 - a).sqrt() * x + a.sqrt() * m
        x = a_prev.sqrt() * x0.clamp(-1, 1) + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_teacher_pairs_do_not_depend_on_the_batch(tmp_path):
    model, diff, _ = build.load_model(_tiny_checkpoint(tmp_path))
    a = teacher_pairs(model, diff, (1, 8, 8), 7, seed=2, sampler="dpm++", steps=5, batch=7)
    b = teacher_pairs(model, diff, (1, 8, 8), 7, seed=2, sampler="dpm++", steps=5, batch=3)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    # x_0 to fp32 rounding: the U-Net's convolutions round differently at batch 7 and 3 (seen: 8e-6 after 5 steps)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-4)
    ref = make_sampler("dpm++", diff, steps=5, spacing="trailing").sample(model, (7, 1, 8, 8), seed=2)
    torch.testing.assert_close(a[1], ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(a[0], _x_T(2, (7, 1, 8, 8)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- closed form: Gaussian data
class _ExactDenoiser(torch.nn.Module):
    """eps*(x, t) for data N(0, s^2 I): E[eps | x_t] = sqrt(1 - ab) x / (ab s^2 + 1 - ab)."""

    def __init__(self, ab, s2):
        super().__init__()
        self.ab, self.s2 = ab, s2

    def forward(self, x, t):
        ab = self.ab[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * self.s2 + 1 - ab)


class _LinearStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.w * x


def test_one_call_linear_student_converges_to_the_closed_form_ode_map():
    s2 = 0.25
    # linear schedule: at t = 999 of the cosine one x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) amplifies 2e4x, so the
    # fp32 resolution of a 1-call eps student's gain would be ~1e-3
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000), prediction="eps")
    ab = diff.schedule.alphas_cumprod
    teacher = _ExactDenoiser(ab, s2)
    x_T, x_0 = teacher_pairs(teacher, diff, (1, 4, 4), 512, seed=0, sampler="unipc", steps=50, spacing="logsnr",
                             clip=False)
    t0, t1 = diff.num_timesteps - 1, make_sampler("unipc", diff, 50, spacing="logsnr").timesteps[-1].item()
    var = lambda t: ab[t] * s2 + 1 - ab[t]  # noqa: E731
    # the PF-ODE from t0 to t1 scales x by sqrt(var(t1) / var(t0)); the exact denoiser's x0 at t1 is g(t1) x
    gain = (ab[t1].sqrt() * s2 / var(t1) * (var(t1) / var(t0)).sqrt()).item()
    fit = float((x_T * x_0).sum() / (x_T * x_T).sum())
    assert fit == pytest.approx(gain, rel=2e-4)  # the teacher's solver itself follows the ODE
    assert float((x_0 - fit * x_T).abs().max()) < 5e-5  # and its map is linear

    students = StudentSet({1: _LinearStudent()})
    smp = {1: student_sampler(diff, student_timesteps(diff, 1))}
    opt = torch.optim.Adam(students.parameters(), lr=0.02)
    ones = torch.ones(1, 1, 1, 1)

    def student_gain():
        with torch.no_grad():
            return float(ddim_chain(students.for_calls(1), smp[1], ones, clip=False).reshape(()))

    assert abs(student_gain() - gain) > 0.1  # far at init
    losses = [train_step(students, smp, x_T, x_0, opt, clip=False)[1] for _ in range(500)]
    assert student_gain() == pytest.approx(fit, rel=1e-4)  # the teacher's map, to fp32 accuracy
    assert student_gain() == pytest.approx(gain, rel=3e-4)  # = the closed form up to the teacher's solver error
    assert losses[-1] < 1e-3 * losses[0]


# ----------------------------------------------------------------------------- K = the teacher's steps: loss 0
KINDS = [
    ({}, {}),
    ({}, {"prediction": "x0", "schedule": "cosine"}),
    ({}, {"prediction": "v"}),
    ({"learn_sigma": True, "out_channels": 2}, {"variance": "learned_range", "loss": "hybrid"}),
]


@pytest.mark.parametrize("model_kw,diff_kw", KINDS, ids=["eps-linear", "x0-cosine", "v", "learned-range"])
def test_student_with_the_teachers_steps_reproduces_it_at_init(tmp_path, model_kw, diff_kw):
    teacher = _tiny_checkpoint(tmp_path / "t", model_kw, diff_kw)
    r = distill(checkpoint=teacher, calls=(3,), steps=2, out_dir=str(tmp_path / "d"), teacher_sampler="ddim",
                teacher_steps=3, num_pairs=16, batch_size=8, lr=1e-3, progress=False, student_prediction="teacher",
                loss="x0")
    # the student's chain is the teacher's solver: loss 0 up to fp32 rounding (the pairs and the training batch
    # run the U-Net at different batch sizes, whose convolutions round differently: ~1e-6 per pixel, ~1e-12 in
    # the squared loss; the pseudo-Huber one would read ~||e||^2 / 2c, ~1e-8)
    assert r.losses[0]["loss_3"] < 1e-10
    assert r.timesteps == {3: [39, 26, 12]}  # trailing: round(T - i T / K) - 1


def test_class_conditional_teacher_is_distilled_guided(tmp_path):
    teacher = _tiny_checkpoint(tmp_path / "t", {"num_classes": 3})
    kw = dict(checkpoint=teacher, calls=(2,), steps=1, teacher_sampler="ddim", teacher_steps=2, num_pairs=12,
              batch_size=6, progress=False, student_prediction="teacher", loss="x0")
    # loss x0 (squared): the fp32 rounding between the guided and the plain call (|e| ~ 1e-6) stays ~1e-13 in it
    r = distill(out_dir=str(tmp_path / "d"), guidance_scale=1.0, **kw)
    assert r.losses[0]["loss_2"] < 1e-10  # student called with the labels = the teacher guided at w = 1
    kw.update(steps=15, lr=2e-3, batch_size=12)
    r = distill(out_dir=str(tmp_path / "g"), guidance_scale=3.0, **kw)
    # at w = 3 the student starts as the conditional model (one call per step, no guidance branch) and moves
    # towards the guided teacher's map: the loss on all pairs, before and after
    from safetensors.torch import load_file

    pairs = load_file(str(tmp_path / "g" / "teacher_pairs.safetensors"))
    model, diff, cfg = build.load_model(r.checkpoint, use_ema=False)
    teacher_model, _, _ = build.load_model(teacher)
    smp = student_for(model, diff, cfg, 2)[1]

    def loss(m):
        with torch.no_grad():
            return float((ddim_chain(m, smp, pairs["x_T"], model_kwargs={"y": pairs["y"]}) - pairs["x_0"]).square().mean())

    assert loss(teacher_model) > 1e-3 and loss(model.for_calls(2)) < 0.8 * loss(teacher_model)
    assert pairs["y"].shape == (12,) and int(pairs["y"].max()) < 3
    with pytest.raises(ValueError, match="guidance_scale is required"):
        distill(out_dir=str(tmp_path / "e"), **kw)


# ----------------------------------------------------------------------------- resume
def test_resume_is_exact(tmp_path):
    teacher = _tiny_checkpoint(tmp_path / "t")
    kw = dict(checkpoint=teacher, calls=(1, 2), num_pairs=32, batch_size=8, lr=1e-3, save_every=2, progress=False,
              teacher_steps=4)
    full = distill(steps=4, out_dir=str(tmp_path / "a"), **kw)
    distill(steps=2, out_dir=str(tmp_path / "b"), **kw)
    with pytest.raises(ValueError, match="--resume"):
        distill(steps=4, out_dir=str(tmp_path / "b"), **kw)  # a fresh run over an existing one
    rest = distill(steps=4, out_dir=str(tmp_path / "b"), resume=True, **kw)
    assert [e["loss"] for e in rest.losses] == [e["loss"] for e in full.losses[2:]]
    a, b = ck.load_checkpoint(full.checkpoint), ck.load_checkpoint(rest.checkpoint)
    for name in a.model:
        torch.testing.assert_close(a.model[name], b.model[name], rtol=0, atol=0)
        torch.testing.assert_close(a.ema[name], b.ema[name], rtol=0, atol=0)
    logs = [json.loads(l) for l in open(tmp_path / "b" / "log.jsonl")]
    assert [e["step"] for e in logs] == [1, 2, 3, 4] or [e["step"] for e in logs][-1] == 4


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_named(tmp_path):
    teacher = _tiny_checkpoint(tmp_path / "t")
    with pytest.raises(ValueError, match="^calls must be"):
        distill(checkpoint=teacher, calls=(0,), out_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"calls must be at most the teacher's steps \(--teacher-steps 4\)"):
        distill(checkpoint=teacher, calls=(2, 5), teacher_steps=4, out_dir=str(tmp_path / "x"))
    clf = os.path.join(os.path.dirname(ck.BUNDLED_MODEL), "digits_classifier.safetensors")
    with pytest.raises(ValueError, match="^checkpoint must be a trained fastddpm diffusion model"):
        distill(checkpoint=clf, calls=(1,), steps=1, out_dir=str(tmp_path / "y"), progress=False)
    run = tmp_path / "trainrun"
    _tiny_checkpoint(run)  # a `fastddpm train` run directory
    with pytest.raises(ValueError, match="holds a training run, not a distillation run: --resume"):
        distill(checkpoint=teacher, calls=(1,), out_dir=str(run), resume=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from fastddpm.cli import main

    assert main(["distill", "--calls", "0", "--out-dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastddpm distill: error: --calls must be")
    assert main(["distill", "--calls", "1,x", "--out-dir", str(tmp_path / "x")]) == 1
    assert "--calls must be" in capsys.readouterr().err


def test_fd_distill_is_the_function_whatever_was_imported():
    import fastddpm.cli.distill  # noqa: F401
    import fastddpm.distillation

    assert fd.distill is fastddpm.distillation.distill and fd.DistillConfig is DistillConfig


def test_cli_defaults_match_the_library():
    from fastddpm.cli.distill import _DEFAULTS

    d = DistillConfig()
    for k, v in vars(_DEFAULTS).items():
        assert getattr(d, k) == v, k


# ----------------------------------------------------------------------------- students are checkpoints
@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill")
    teacher = _tiny_checkpoint(base / "t")
    out = str(base / "d")
    distill(checkpoint=teacher, calls=(1, 2), steps=3, out_dir=out, num_pairs=16, batch_size=8, lr=1e-3,
            teacher_steps=4, progress=False)
    return out


def test_student_loads_everywhere_and_samples_its_chain(student_run):
    model, diff, cfg = build.load_model(student_run)
    assert isinstance(model, StudentSet) and model.calls == [1, 2]
    for k in (1, 2):
        net, smp = student_for(model, diff, cfg, k)
        assert smp.row_predictions == ["x0"] + ["eps"] * (k - 1)  # "auto": an x0 output at the first step
        with torch.no_grad():
            ref = ddim_chain(net, smp, _x_T(0, (4, 1, 8, 8)))
        pipe = fd.load(student_run, device="cpu")
        torch.testing.assert_close(pipe(4, seed=0, num_inference_steps=k, output_type="pt").images, ref,
                                   rtol=2e-5, atol=2e-5)  # fp32: FastSampler's in-place op, another order
        fast = fd.FastSampler.from_checkpoint(student_run, steps=k, batch_size=4)
        assert fast.num_steps == k
        torch.testing.assert_close(fast(seed=0), ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"one of the model-call counts this distilled checkpoint holds \(1, 2\), got 3"):
        fd.load(student_run, device="cpu")(2, num_inference_steps=3)


def test_cli_sample_and_eval_take_students(student_run, tmp_path, capsys):
    from fastddpm.cli import main

    npz = str(tmp_path / "s.npz")
    assert main(["sample", "--checkpoint", student_run, "--steps", "2", "--num-images", "6", "--npz", npz,
                 "--no-progress"]) == 0
    imgs = np.load(npz)["images"]
    model, diff, cfg = build.load_model(student_run)
    with torch.no_grad():
        ref = ddim_chain(*student_for(model, diff, cfg, 2), _x_T(0, (6, 1, 8, 8)))
    np.testing.assert_array_equal(imgs, fd.to_uint8(ref))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", student_run, "--steps", "4", "--num-images", "2", "--npz", npz]) == 1
    assert "--steps must be one of the model-call counts this distilled checkpoint holds (1, 2), got 4" in \
        capsys.readouterr().err


def test_export_merges_runs_into_one_small_file(student_run, tmp_path):
    teacher = ck.load_checkpoint(student_run, load_state=False).config["distill"]["teacher"]["checkpoint"]
    other = str(tmp_path / "k3")
    distill(checkpoint=teacher, calls=(3,), steps=1, out_dir=other, num_pairs=8, batch_size=4, teacher_steps=4,
            progress=False)
    out = str(tmp_path / "students.safetensors")
    from fastddpm.distillation import export_students

    export_students([student_run, other], out, dtype="fp16")
    model, diff, cfg = build.load_model(out)
    assert model.calls == [1, 2, 3] and cfg["distill"]["calls"]["3"] == [39, 26, 12]
    ref, _, _ = build.load_model(student_run)
    for name, v in ref.for_calls(2).state_dict().items():  # fp16 storage: the weights to fp16 rounding
        torch.testing.assert_close(model.for_calls(2).state_dict()[name], v, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="student K = 1 twice"):
        export_students([student_run, student_run], str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="^checkpoints must be distillation runs"):
        export_students([teacher], str(tmp_path / "y.safetensors"))


def test_cli_eval_scores_the_student_it_is_asked_for(student_run, tmp_path):
    from fastddpm.cli import main

    out = str(tmp_path / "e.json")
    argv = ["eval", "--checkpoint", student_run, "--num", "12", "--batch-size", "6", "--no-progress",
            "--device", "cpu", "--data", "digits", "--ref-stats", str(tmp_path / "ref.npz"), "--json", out]
    assert main(argv + ["--steps", "1"]) == 0
    one = json.loads(open(out).read())
    assert one["steps"] == 1 and one["sampler"] == "distilled"
    assert main(argv + ["--steps", "2"]) == 0
    two = json.loads(open(out).read())
    assert two["steps"] == 2 and two["fid"] != one["fid"]  # another student, other samples
    assert main(argv + ["--steps", "3"]) == 1


def test_quality_table_draws_a_student_through_its_sampler(student_run):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quality_table", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                                      "quality_table.py"))
    qt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qt)
    u8, made, ts = qt.draw(f"fastddpm:distilled:{student_run}", 2, 0, 5, None, None, (1, 8, 8), {})
    model, diff, cfg = build.load_model(student_run)
    with torch.no_grad():
        ref = ddim_chain(*student_for(model, diff, cfg, 2), _x_T(0, (5, 1, 8, 8)))
    assert made == 2 and ts == cfg["distill"]["calls"]["2"]
    np.testing.assert_array_equal(u8, fd.to_uint8(ref))
    with pytest.raises(KeyError, match="holds"):
        qt.draw(f"fastddpm:distilled:{student_run}", 4, 0, 5, None, None, (1, 8, 8), {})
    assert qt.label(f"fastddpm:distilled:{student_run}") == "fastddpm distilled student (d)"


# ----------------------------------------------------------------------------- the training loop's machinery
def test_pairs_x_T_never_the_sampling_noise_of_the_same_seed(tmp_path):
    from safetensors.torch import load_file

    from fastddpm.distillation import pair_seed

    teacher = _tiny_checkpoint(tmp_path / "t")
    distill(checkpoint=teacher, calls=(1,), steps=1, out_dir=str(tmp_path / "d"), num_pairs=6, batch_size=6,
            teacher_steps=2, progress=False)
    x_T = load_file(str(tmp_path / "d" / "teacher_pairs.safetensors"))["x_T"]
    torch.testing.assert_close(x_T, _x_T(pair_seed(0), (6, 1, 8, 8)), rtol=0, atol=0)
    assert pair_seed(0) != 0 and pair_seed(0) < 2**63 and pair_seed(1) != pair_seed(0)
    assert float((x_T - _x_T(0, (6, 1, 8, 8))).abs().min()) > 0  # not seed 0's (what `sample --seed 0` draws)


def test_log_has_per_call_window_means_and_the_cosine_lr(tmp_path):
    import math

    teacher = _tiny_checkpoint(tmp_path / "t")
    lr, steps, warm = 1e-3, 6, 2
    r = distill(checkpoint=teacher, calls=(1, 2), steps=steps, out_dir=str(tmp_path / "d"), num_pairs=16,
                batch_size=8, lr=lr, warmup_steps=warm, log_every=3, teacher_steps=4, progress=False)
    logs = [json.loads(line) for line in open(tmp_path / "d" / "log.jsonl")]
    assert [e["step"] for e in logs] == [3, 6] and [e["step"] for e in r.losses] == list(range(1, steps + 1))

    def lr_at(s):  # the lr of the step after s steps: linear warm-up, then cosine to 0 at `steps`
        return lr * (s + 1) / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))

    for rec in logs:
        window = r.losses[rec["step"] - 3:rec["step"]]
        for k in (1, 2):
            assert rec[f"loss_{k}"] == pytest.approx(np.mean([e[f"loss_{k}"] for e in window]), rel=1e-6)
        assert rec["loss"] == pytest.approx(np.mean([e["loss"] for e in window]), rel=1e-6)
        assert rec["lr"] == pytest.approx(lr_at(rec["step"] - 1), rel=1e-12)
    for e in r.losses:
        assert e["loss"] == pytest.approx(e["loss_1"] + e["loss_2"], rel=1e-6)


def test_overwrite_replaces_and_runs_never_continue_each_other(tmp_path):
    from fastddpm.train import TrainConfig, train

    teacher = _tiny_checkpoint(tmp_path / "t")
    kw = dict(checkpoint=teacher, calls=(1,), num_pairs=8, batch_size=4, teacher_steps=2, progress=False)
    out = str(tmp_path / "d")
    distill(steps=3, out_dir=out, **kw)
    with pytest.raises(ValueError, match="give one of them"):
        distill(steps=2, out_dir=out, overwrite=True, resume=True, **kw)
    r = distill(steps=2, out_dir=out, overwrite=True, **kw)
    assert r.checkpoint.endswith("step_00000002") and ck.list_checkpoints(out)[-1][0] == 2
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))][-1] == 2
    tiny = dict(TINY_MODEL, base_channels=8, channel_mults=(1,), attention_resolutions=())
    tcfg = TrainConfig(out_dir=out, resume=True, steps=3, progress=False, dataset="digits", image_size=8,
                       **{k: v for k, v in tiny.items() if k in ("base_channels", "channel_mults", "num_res_blocks",
                                                                 "attention_resolutions", "dropout", "groups")},
                       schedule="linear", num_timesteps=40)
    with pytest.raises(ValueError, match="is a distillation run"):
        train(tcfg)


@pytest.mark.slow  # two distillation processes
def test_ddp_two_processes_match_one(tmp_path):
    import torch._dynamo  # noqa: F401  (imported once here, inherited by the forked workers)
    import torch.multiprocessing as mp

    teacher = _tiny_checkpoint(tmp_path / "t")
    one = distill(out_dir=str(tmp_path / "one"), **_ddp_kw(teacher))
    res = tmp_path / "res"
    res.mkdir()
    mp.start_processes(_ddp_distill_worker, args=(2, free_port(), teacher, str(tmp_path / "two"), str(res)),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(res / f"rank{i}.pt") for i in (0, 1))
    # the held-out loss: each rank scored its slice (2 and 3 of the 5 pairs) and they summed: the one-process value
    assert len(one.val_losses) == 1 and r0["val"] == r1["val"]
    for key in ("val_loss_1", "val_loss_2"):
        assert r0["val"][-1][key] == pytest.approx(one.val_losses[-1][key], rel=1e-4)
    # the global batch is the same whatever the number of processes: each rank's loss is its half's, and
    # the mean of the two is the one-process loss (fp32: another summation order)
    for a, b, c in zip(r0["losses"], r1["losses"], one.losses):
        for key in ("loss_1", "loss_2"):
            assert (a[key] + b[key]) / 2 == pytest.approx(c[key], rel=1e-5)
    from safetensors.torch import load_file

    p1, p2 = (load_file(str(tmp_path / d / "teacher_pairs.safetensors")) for d in ("one", "two"))
    # each rank drew a slice (8 and 7 + 1 padding row of the 15 pairs) and they exchanged them: x_T exactly,
    # x_0 to fp32 batch-size rounding (the teacher ran on 8 and 7 images instead of 15; ~2e-5 seen)
    torch.testing.assert_close(p2["x_T"], p1["x_T"], rtol=0, atol=0)
    torch.testing.assert_close(p2["x_0"], p1["x_0"], rtol=0, atol=1e-4)  # fp32 rounding x 4 teacher steps
    two = ck.load_checkpoint(str(tmp_path / "two"))
    ref = ck.load_checkpoint(one.checkpoint)
    assert two.state["world_size"] == 2
    for name in ref.model:  # the gradients were averaged across ranks: the one-process weights
        torch.testing.assert_close(two.model[name], ref.model[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two.ema[name], ref.ema[name], rtol=1e-4, atol=1e-6)


def _ddp_kw(teacher):
    return dict(checkpoint=teacher, calls=(1, 2), steps=3, num_pairs=15, val_pairs=5, batch_size=8, lr=1e-3,
                teacher_steps=4, log_every=1, progress=False)


def _ddp_distill_worker(rank, world, port, teacher, out_dir, result_dir):
    as_rank(rank, world, port)
    r = distill(out_dir=out_dir, **_ddp_kw(teacher))
    torch.save({"losses": r.losses, "val": r.val_losses}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_resume_with_other_settings_is_refused_before_the_pairs_are_redrawn(tmp_path, capsys):
    from fastddpm.cli import main

    teacher = _tiny_checkpoint(tmp_path / "t")
    kw = dict(checkpoint=teacher, calls=(1,), batch_size=4, teacher_steps=2, progress=False)
    out = str(tmp_path / "d")
    distill(steps=2, out_dir=out, num_pairs=8, **kw)
    pairs = os.path.join(out, "teacher_pairs.safetensors")
    before = open(pairs, "rb").read()
    with pytest.raises(ValueError, match=r"other settings \(num_pairs: run 8 vs now 12\)"):
        distill(steps=3, out_dir=out, num_pairs=12, resume=True, **kw)
    with pytest.raises(ValueError, match="student_prediction: run 'auto' vs now 'eps'"):
        distill(steps=3, out_dir=out, num_pairs=8, resume=True, student_prediction="eps", **kw)
    assert open(pairs, "rb").read() == before
    # `fastddpm train --resume` does not continue a distillation run: one line saying what does
    capsys.readouterr()
    assert main(["train", "--out-dir", out, "--resume", "--steps", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a distillation run: continue it with `fastddpm distill --resume`" in err[0]


def test_pairs_of_another_run_are_reused_only_when_drawn_alike(tmp_path):
    from safetensors.torch import load_file

    teacher = _tiny_checkpoint(tmp_path / "t")
    other = _tiny_checkpoint(tmp_path / "o", seed=1)
    kw = dict(calls=(1,), steps=1, num_pairs=8, batch_size=4, teacher_steps=2, progress=False)
    distill(checkpoint=teacher, out_dir=str(tmp_path / "a"), **kw)
    drawn = load_file(str(tmp_path / "a" / "teacher_pairs.safetensors"))
    r = distill(checkpoint=teacher, out_dir=str(tmp_path / "b"), pairs=str(tmp_path / "a"), **kw)
    assert not os.path.exists(tmp_path / "b" / "teacher_pairs.safetensors")  # read, not drawn again
    # the same pairs, so the same first loss as run a's (its pairs file is what both trained on)
    a = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert r.losses[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6) and drawn["x_T"].shape[0] == 8
    with pytest.raises(ValueError, match=r"pairs .* were drawn with other settings \(teacher differ\)"):
        distill(checkpoint=other, out_dir=str(tmp_path / "c"), pairs=str(tmp_path / "a"), **kw)
    with pytest.raises(ValueError, match=r"pairs .* were drawn with other settings \(num_pairs, philox_seed, seed"):
        distill(checkpoint=teacher, out_dir=str(tmp_path / "d"), pairs=str(tmp_path / "a"),
                **dict(kw, num_pairs=12), seed=3)
    with pytest.raises(ValueError, match="^pairs must be a teacher_pairs.safetensors file"):
        distill(checkpoint=teacher, out_dir=str(tmp_path / "e"), pairs=str(tmp_path / "nothing"), **kw)
    # a run with more pairs of the same stream lends its first ones (image i is the same whatever the count): the
    # 8 of run a, to fp32 rounding (the teacher ran them in a batch of 12, not 8)
    distill(checkpoint=teacher, out_dir=str(tmp_path / "big"), **dict(kw, num_pairs=12))
    r8 = distill(checkpoint=teacher, out_dir=str(tmp_path / "f"), pairs=str(tmp_path / "big"), **kw)
    assert not os.path.exists(tmp_path / "f" / "teacher_pairs.safetensors")
    assert r8.losses[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4)
    with pytest.raises(ValueError, match=r"pairs .* were drawn with other settings \(num_pairs differ\)"):
        distill(checkpoint=teacher, out_dir=str(tmp_path / "g"), pairs=str(tmp_path / "a"), **dict(kw, num_pairs=12))


def test_validation_loss_is_the_sampled_students_on_held_out_pairs(tmp_path):
    from safetensors.torch import load_file

    from fastddpm.distillation import pair_seed

    teacher = _tiny_checkpoint(tmp_path / "t")
    out = tmp_path / "d"
    r = distill(checkpoint=teacher, calls=(2, 3), steps=4, out_dir=str(out), num_pairs=16, val_pairs=6, batch_size=8,
                lr=1e-3, teacher_steps=4, save_every=2, log_every=2, progress=False)
    seed = pair_seed(0)
    tmodel, tdiff, _ = build.load_model(teacher)
    val, train = load_file(str(out / "val_pairs.safetensors")), load_file(str(out / "teacher_pairs.safetensors"))
    # the held-out pairs are the 6 images after the 16 training ones in the same noise stream, run by the teacher
    torch.testing.assert_close(val["x_T"], _x_T(seed, (6, 1, 8, 8), offset=16), rtol=0, atol=0)
    torch.testing.assert_close(train["x_T"], _x_T(seed, (16, 1, 8, 8)), rtol=0, atol=0)
    ref0 = make_sampler("unipc", tdiff, steps=4, spacing="trailing").sample(tmodel, (6, 1, 8, 8), seed=seed,
                                                                            image_offset=16)
    torch.testing.assert_close(val["x_0"], ref0, rtol=0, atol=1e-4)  # fp32 rounding at another batch size
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [(e["step"], "val_loss_2" in e) for e in logs] == [(2, True), (4, True)]
    assert r.val_losses == [{k: e[k] for k in ("step", "loss_2", "loss_3", "val_loss_2", "val_loss_3")} for e in logs]
    # the last record: the EMA students as every loader samples them, each from the held-out x_T by its own
    # sampler, scored by its training loss (the default "auto": squared error for K = 2, pseudo-Huber for K = 3,
    # c = 0.00054 sqrt(D), D = 64 values per image)
    model, diff, cfg = build.load_model(str(out))
    assert cfg["distill"]["loss"] == {"2": "x0", "3": "pseudo-huber"}
    c = 0.00054 * 8
    for k in (2, 3):
        m, smp = student_for(model, diff, cfg, k)
        got = smp.sample(m, (6, 1, 8, 8), seed=seed, image_offset=16)
        err = (got - val["x_0"]).double().flatten(1).numpy()
        want = float(np.mean((err ** 2).mean(1) if k == 2 else np.sqrt((err ** 2).sum(1) + c * c) - c))
        assert logs[-1][f"val_loss_{k}"] == pytest.approx(want, rel=1e-4)
        assert want > 0
    r0 = distill(checkpoint=teacher, calls=(1,), steps=2, out_dir=str(tmp_path / "n"), num_pairs=16, val_pairs=0,
                 batch_size=8, teacher_steps=4, log_every=1, progress=False)
    assert r0.val_losses == [] and not (tmp_path / "n" / "val_pairs.safetensors").exists()
    assert not any("val_loss_1" in json.loads(line) for line in open(tmp_path / "n" / "log.jsonl"))


def test_cli_prints_training_and_held_out_loss(tmp_path, capsys):
    from fastddpm.cli import main

    teacher = _tiny_checkpoint(tmp_path / "t")
    rc = main(["distill", "--checkpoint", teacher, "--calls", "1", "--steps", "3", "--num-pairs", "8",
               "--val-pairs", "4", "--batch-size", "4", "--teacher-steps", "2", "--log-every", "1",
               "--out-dir", str(tmp_path / "d"), "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.load(open(tmp_path / "r.json"))
    val = res["final_val_losses"]["val_loss_1"]
    logs = [json.loads(line) for line in open(tmp_path / "d" / "log.jsonl")]
    assert f"K=1 {logs[-1]['loss_1']:.4g} / {val:.4g}" in printed  # the last log window's training loss
    assert logs[-1]["val_loss_1"] == val and "val_loss_1" not in logs[0]


def test_pseudo_huber_loss_is_the_closed_form_and_picks_a_mode_where_mse_blends():
    from fastddpm.distillation import image_losses

    g = torch.Generator().manual_seed(3)
    pred, x0 = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    e = (pred - x0).double().flatten(1).numpy()
    c = 0.00054 * 8
    np.testing.assert_allclose(image_losses(pred, x0, "pseudo-huber").numpy(), np.sqrt((e ** 2).sum(1) + c * c) - c,
                               rtol=1e-5)
    np.testing.assert_allclose(image_losses(pred, x0, "x0").numpy(), (e ** 2).mean(1), rtol=1e-5)
    with pytest.raises(ValueError, match="loss must be one of"):
        image_losses(pred, x0, "l1")
    # one input, two outcomes (3 of 4 pairs land on +1, one on -1): the squared loss's best constant is their
    # mean, 0.5 (a blend of the two), the pseudo-Huber's their geometric median, the majority outcome +1
    targets = torch.cat([torch.ones(3, 1, 8, 8), -torch.ones(1, 1, 8, 8)])
    for loss, want in (("x0", 0.5), ("pseudo-huber", 1.0)):
        w = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.02)
        for _ in range(600):
            opt.zero_grad()
            image_losses(w.expand(4, 1, 8, 8), targets, loss).mean().backward()
            opt.step()
        assert w.item() == pytest.approx(want, abs=0.02), loss


def test_distill_fit_script_scores_training_and_held_out_pairs(student_run, capsys):
    import importlib.util
    import re

    from safetensors.torch import load_file

    from fastddpm.distillation import pair_seed

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("distill_fit", os.path.join(root, "scripts", "distill_fit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    teacher = os.path.join(os.path.dirname(student_run), "t")
    mod.main([student_run, "--pairs", student_run, "--teacher", teacher, "--num", "6", "--heldout-seed", "5"])
    got = {int(k): (float(a), float(b)) for k, a, b in
           re.findall(r"K=(\d): squared error on training pairs ([\d.e-]+), held-out ([\d.e-]+)", capsys.readouterr().out)}
    # the reference: each EMA student sampled by its own sampler, against the stored pairs and against the teacher's
    # UniPC-20 (trailing) from the held-out seed's x_T, in fp64
    model, diff, cfg = build.load_model(student_run)
    tmodel, tdiff, _ = build.load_model(teacher)
    pairs = load_file(os.path.join(student_run, "teacher_pairs.safetensors"))
    held = make_sampler("unipc", tdiff, steps=20, spacing="trailing").sample(tmodel, (6, 1, 8, 8), seed=pair_seed(5))
    assert sorted(got) == [1, 2]
    for k in (1, 2):
        m, smp = student_for(model, diff, cfg, k)
        with torch.no_grad():
            train = ddim_chain(m, smp, pairs["x_T"][:6])
        out = smp.sample(m, (6, 1, 8, 8), seed=pair_seed(5))
        assert got[k][0] == pytest.approx((train - pairs["x_0"][:6]).double().square().mean().item(), rel=1e-3)
        assert got[k][1] == pytest.approx((out - held).double().square().mean().item(), rel=1e-3)
