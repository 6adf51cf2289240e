"""Evaluation drivers and the eval / nll CLI handlers, against one-shot computations and closed forms."""
import json
import math
import os
import statistics

import numpy as np
import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ck
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.evaluate import (ReferenceStats, evaluate_samples, load_images, nll_over_dataset, reference_stats,
                               sample_batches)
from fastddpm.metrics import (frechet_distance, inception_score, kernel_inception_distance, load_stats,
                              precision_recall)
from fastddpm.schedule import NoiseSchedule
from fastddpm.unet import UNet

TINY_MODEL = dict(image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                  attention_resolutions=[], dropout=0.0, groups=8)
TINY_DIFFUSION = dict(schedule="linear", num_timesteps=40, prediction="eps", variance="fixed_small", loss="simple")


class LinearExtractor:
    """A stand-in classifier: fixed random projections of the pixels (features) and softmax logits."""

    name = "linear-test"

    def __init__(self, in_dim=64, dim=6, num_classes=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(in_dim, dim, generator=g, dtype=torch.float64)
        self.v = torch.randn(in_dim, num_classes, generator=g, dtype=torch.float64)
        self.dim, self.num_classes = dim, num_classes

    def features_and_probs(self, x):
        flat = x.double().flatten(1)
        return flat @ self.w, torch.softmax(flat @ self.v, 1)

    def __call__(self, x):
        return self.features_and_probs(x)[0]


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    u = UNet(**TINY_MODEL)
    with torch.no_grad():
        for p in u.parameters():  # the output conv is zero-initialised: make the model do something
            p.add_(0.02 * torch.randn_like(p))
    return u.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(103, 1, 8, 8, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def ref_images():
    g = torch.Generator().manual_seed(2)
    return torch.tanh(torch.randn(90, 1, 8, 8, generator=g))


def _chunks(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(x[i:i + s])
        i += s
    assert i == len(x)
    return out


# ----------------------------------------------------------------------------- streaming == one shot
@pytest.mark.parametrize("announce", [True, False])
def test_streaming_equals_one_shot(images, ref_images, announce):
    ext = LinearExtractor()
    f, p = (t.numpy() for t in ext.features_and_probs(images))
    fr, _ = (t.numpy() for t in ext.features_and_probs(ref_images))
    batches = _chunks(images, [7, 30, 1, 64, 1])  # boundaries that do not line up with the IS splits
    res = evaluate_samples(iter(batches), ext, ref_images, metrics=("fid", "kid", "is", "pr"),
                           num=103 if announce else None, kid_subsets=5, kid_subset_size=50, is_splits=10, pr_k=3)
    fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert res["fid"] == pytest.approx(fid, rel=1e-9)
    kid = kernel_inception_distance(f, fr, num_subsets=5, subset_size=50, seed=0)
    assert res["kid_mean"] == pytest.approx(kid[0], rel=1e-9) and res["kid_std"] == pytest.approx(kid[1], rel=1e-9)
    is_ = inception_score(p, splits=10)
    tol = 1e-9 if announce else 1e-6  # without num the probs are kept in float32
    assert res["is_mean"] == pytest.approx(is_[0], rel=tol) and res["is_std"] == pytest.approx(is_[1], rel=1e-5)
    pr = precision_recall(fr, f, k=3)
    assert (res["precision"], res["recall"]) == pytest.approx(pr, abs=1e-12)
    counts = np.bincount(p.argmax(1), minlength=5)
    assert res["class_counts"] == counts.tolist()
    assert res["class_fraction_min"] == pytest.approx(counts.min() / 103)
    assert res["confidence_rate"] == pytest.approx((p.max(1) >= 0.9).mean())
    assert res["num_samples"] == 103


def test_streaming_fid_independent_of_batching(images, ref_images):
    ext = LinearExtractor()
    a = evaluate_samples([images], ext, ref_images, metrics=("fid",))
    b = evaluate_samples(images.split(10), ext, ref_images, metrics=("fid",))
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-10)


def test_identical_sets_give_zero_fid(images):
    ext = LinearExtractor()
    res = evaluate_samples(images.split(17), ext, images, metrics=("fid",))
    assert abs(res["fid"]) < 1e-8


def test_evaluate_errors(images, ref_images, tmp_path):
    ext = LinearExtractor()
    with pytest.raises(ValueError, match="need a reference"):
        evaluate_samples([images], ext, None, metrics=("fid",))
    with pytest.raises(ValueError, match="metrics must be among"):
        evaluate_samples([images], ext, ref_images, metrics=("fid", "lpips"))
    with pytest.raises(ValueError, match="announced"):
        evaluate_samples([images], ext, ref_images, metrics=("fid",), num=50)
    with pytest.raises(ValueError, match="not found"):
        evaluate_samples([images], ext, str(tmp_path / "missing.npz"), metrics=("fid",))

    class NoClasses:
        name, dim = "plain", 64

        def __call__(self, x):
            return x.flatten(1)

    with pytest.raises(ValueError, match="classifier"):
        evaluate_samples([images], NoClasses(), None, metrics=("is",))
    # IS alone needs no reference
    res = evaluate_samples([images], ext, None, metrics=("is",), is_splits=2)
    assert res["is_mean"] > 1.0


# ----------------------------------------------------------------------------- reference cache
def test_reference_cache_roundtrip(images, ref_images, tmp_path):
    ext = LinearExtractor()
    path = str(tmp_path / "ref.npz")
    ref = reference_stats(ref_images, ext, batch_size=16, cache=path)
    assert os.path.isfile(path)
    fr = ext(ref_images).numpy()
    np.testing.assert_allclose(ref.mu, fr.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(fr, rowvar=False), rtol=1e-10, atol=1e-12)
    mu, sigma = load_stats(path)  # the metrics module reads it too
    np.testing.assert_allclose(mu, ref.mu)
    again = reference_stats("never read: the cache exists", ext, cache=path)
    np.testing.assert_allclose(again.sigma, ref.sigma)
    assert again.count == 90 and again.extractor == "linear-test"
    np.testing.assert_allclose(again.features, fr)
    a = evaluate_samples([images], ext, path, metrics=("fid", "kid"), kid_subsets=3, kid_subset_size=40)
    b = evaluate_samples([images], ext, ref_images, metrics=("fid", "kid"), kid_subsets=3, kid_subset_size=40)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-10) and a["kid_mean"] == pytest.approx(b["kid_mean"], rel=1e-10)

    other = LinearExtractor()
    other.name = "something-else"
    with pytest.raises(ValueError, match="computed with the 'linear-test' features"):
        ReferenceStats.load(path, other)
    # statistics without kept features cannot give KID
    slim = str(tmp_path / "slim.npz")
    reference_stats(ref_images, ext, max_keep=0, cache=slim)
    with pytest.raises(ValueError, match="raw features"):
        evaluate_samples([images], ext, slim, metrics=("kid",))
    assert "fid" in evaluate_samples([images], ext, slim, metrics=("fid",))


def test_load_images_parts():
    ho = load_images("digits", "heldout")
    tr = load_images("digits", "train")
    assert ho.shape == (359, 1, 8, 8) and tr.shape == (1438, 1, 8, 8)
    assert ho.min() >= -1 and ho.max() <= 1
    with pytest.raises(ValueError, match="part must be one of"):
        load_images("digits", "test")
    with pytest.raises(ValueError, match="only defined"):
        load_images("/some/folder", "heldout")


# ----------------------------------------------------------------------------- bits/dim
def test_nll_over_dataset_matches_nll_bpd_and_stderr():
    diff = GaussianDiffusion(NoiseSchedule.linear(40))
    model = _tiny_unet()
    x = load_images("digits", "heldout")[:5]
    res = nll_over_dataset(diff, model, x, batch_size=3, seed=5, return_per_image=True)
    g = torch.Generator().manual_seed(5)
    per = torch.cat([diff.nll_bpd(model, b, generator=g)["total_bpd"] for b in x.split(3)]).double()
    np.testing.assert_allclose(res["per_image"], per.numpy(), rtol=1e-6)
    vals = per.tolist()
    assert res["bpd"] == pytest.approx(statistics.fmean(vals), rel=1e-6)
    assert res["stderr"] == pytest.approx(statistics.stdev(vals) / math.sqrt(5), rel=1e-6)
    assert res["num"] == 5 and res["num_timesteps"] == 40
    assert 0 < res["decoder_bpd"] < res["bpd"]
    one = nll_over_dataset(diff, model, x[:1], batch_size=3)
    assert one["stderr"] == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        nll_over_dataset(diff, model, x, batch_size=0)
    with pytest.raises(ValueError, match="num=6"):
        nll_over_dataset(diff, model, x, num=6)


def test_sample_batches_independent_of_batch_size():
    from fastddpm.samplers import DDIMSampler

    diff = GaussianDiffusion(NoiseSchedule.linear(40))
    model = _tiny_unet()
    s = DDIMSampler(diff, steps=3)
    a = torch.cat(list(sample_batches(model, s, num=7, batch_size=7, shape=(1, 8, 8), seed=3)))
    b = list(sample_batches(model, s, num=7, batch_size=3, shape=(1, 8, 8), seed=3))
    assert [t.shape[0] for t in b] == [3, 3, 1]
    torch.testing.assert_close(a, torch.cat(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CLI handlers
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    u = _tiny_unet()
    cfg = {"model": TINY_MODEL, "diffusion": TINY_DIFFUSION}
    return ck.save_checkpoint(str(run), 1, cfg, u.state_dict(), u.state_dict())


def _parse(argv):
    from fastddpm.cli import build_parser

    return build_parser().parse_args(argv)


def _run(argv):
    args = _parse(argv)
    return args._run(args)


EVAL_KEYS = {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "confidence_rate",
             "class_counts", "class_fractions", "class_fraction_min", "class_fraction_max", "num_samples",
             "ref_confidence_rate", "sampler", "steps", "seed", "checkpoint", "features"}


def test_cli_eval_writes_json_and_caches_reference(tiny_checkpoint, tmp_path, capsys):
    out, stats = str(tmp_path / "eval.json"), str(tmp_path / "ref.npz")
    argv = ["eval", "--checkpoint", tiny_checkpoint, "--sampler", "dpm++", "--steps", "3", "--num", "12",
            "--batch-size", "5", "--seed", "1", "--no-progress", "--device", "cpu"]
    assert _run(argv + ["--data", "digits", "--ref-stats", stats, "--json", out]) == 0
    res = json.loads(open(out).read())
    assert EVAL_KEYS <= set(res), EVAL_KEYS - set(res)
    assert res["num_samples"] == 12 and res["steps"] == 3 and res["sampler"] == "dpm++"
    assert res["reference_count"] == 359  # digits defaults to the held-out part
    assert sum(res["class_counts"]) == 12 and res["fid"] > 0
    table = capsys.readouterr().out  # a short table, the JSON only in --json
    assert f"FID  " in table and f"{res['fid']:.2f}" in table and "same --num (12 here)" in table
    assert os.path.isfile(stats)
    # second run reads the cache (no --data) and, sampling being seeded per image, gets the same numbers
    out2 = str(tmp_path / "eval2.json")
    assert _run(argv + ["--ref-stats", stats, "--json", out2, "--batch-size", "12", "--metrics", "fid,is"]) == 0
    res2 = json.loads(open(out2).read())
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-4)
    assert "kid_mean" not in res2 and "is_mean" in res2


def test_cli_nll_writes_json(tiny_checkpoint, tmp_path):
    out = str(tmp_path / "nll.json")
    assert _run(["nll", "--checkpoint", tiny_checkpoint, "--data", "digits", "--num", "5", "--batch-size", "4",
                 "--seed", "2", "--json", out, "--no-progress", "--device", "cpu"]) == 0
    res = json.loads(open(out).read())
    assert {"bpd", "stderr", "num", "prior_bpd", "decoder_bpd", "part", "checkpoint"} <= set(res)
    assert res["num"] == 5 and res["part"] == "heldout"
    model, diff, _ = build.load_model(tiny_checkpoint)
    direct = nll_over_dataset(diff, model, "digits", part="heldout", num=5, batch_size=4, seed=2)
    assert res["bpd"] == pytest.approx(direct["bpd"], rel=1e-6)
    assert res["stderr"] == pytest.approx(direct["stderr"], rel=1e-6)


def test_cli_errors(tiny_checkpoint, tmp_path):
    base = ["eval", "--checkpoint", tiny_checkpoint, "--num", "4", "--steps", "2", "--no-progress"]
    with pytest.raises(Exception, match="--features must be one of digits, inception"):
        _run(base + ["--features", "vgg"])
    with pytest.raises(Exception, match="no such file"):
        _run(base + ["--ref-stats", str(tmp_path / "missing.npz")])
    with pytest.raises(Exception, match="--metrics must be"):
        _run(base + ["--metrics", "fid,lpips"])
    with pytest.raises(Exception, match="--num must be a positive int"):
        _run(["eval", "--checkpoint", tiny_checkpoint, "--num", "0"])
    with pytest.raises(Exception, match="--part heldout is only defined"):
        _run(["nll", "--checkpoint", tiny_checkpoint, "--data", str(tmp_path), "--part", "heldout"])
    with pytest.raises(ck.CheckpointError, match="not found"):
        _run(["nll", "--checkpoint", str(tmp_path / "nope")])


def test_quality_vs_steps_script_smoke(tiny_checkpoint, tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "quality_vs_steps.py")
    spec = importlib.util.spec_from_file_location("quality_vs_steps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        report = mod.main(["--checkpoint", tiny_checkpoint, "--num", "20", "--batch-size", "8", "--nll-num", "2",
                           "--settings", "ddim:2,dpm++:2", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "quality_vs_steps.json").read_text())
    assert [r["setting"] for r in saved["rows"]][1:] == ["DDIM", "DPM-Solver++"]
    assert saved["rows"][0]["setting"].startswith("real digits") and saved["rows"][0]["digits_fid_sd"] > 0
    assert saved["nll"]["num"] == 2 and saved["num"] == 20
    assert saved["rows"][1]["confidence_vs_real"] == pytest.approx(
        saved["rows"][1]["confidence_rate"] / saved["ref_confidence_rate"])
    md = (tmp_path / "quality_vs_steps.md").read_text()
    assert "| DPM-Solver++ | 2 |" in md and "Bits/dim" in md
    assert report["targets"]["class_balance"]["met"] in (True, False)
