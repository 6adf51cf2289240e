"""Reference statistics for `fastddpm eval` / fd.fid: published pytorch-fid / clean-fid .npz files used as
they are, dataset statistics computed once and cached, --stats-only, and --features inception's wiring."""
import json
import os

import numpy as np
import pytest
import torch

import fastddpm as fd
from fastddpm import checkpoint as ck
from fastddpm.evaluate import load_images, reference_from, stats_cache_path
from fastddpm.features import get_extractor
from fastddpm.metrics import FeatureStats, frechet_distance
from fastddpm.unet import UNet

TINY_MODEL = dict(image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                  attention_resolutions=[4], dropout=0.0, num_heads=1, groups=8)
TINY_DIFFUSION = dict(schedule="linear", num_timesteps=40, prediction="eps", variance="fixed_small", loss="simple")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    u = UNet(**TINY_MODEL)
    return ck.save_checkpoint(str(tmp_path_factory.mktemp("run")), 1, {"model": TINY_MODEL, "diffusion": TINY_DIFFUSION},
                              u.state_dict(), u.state_dict())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(argv):
    from fastddpm.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._run(args)


def _published(path, images, extractor):
    """Statistics written as pytorch-fid's --save-stats (and clean-fid) write them: mu and sigma only."""
    with torch.no_grad():
        f = extractor(images).double().numpy()
    np.savez_compressed(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    return f


def _digit_folder(path, n=24):
    path.mkdir()
    for i, im in enumerate(fd.to_pil(load_images("digits")[:n])):
        im.save(path / f"{i:03d}.png")
    return path


def test_published_stats_are_used_as_they_are(tiny_checkpoint, tmp_path, cache):
    ext = get_extractor("digits")
    _published(tmp_path / "pub.npz", load_images("digits", "heldout"), ext)
    base = ["eval", "--checkpoint", tiny_checkpoint, "--sampler", "ddim", "--steps", "2", "--num", "10",
            "--batch-size", "10", "--no-progress", "--device", "cpu"]
    assert _run(base + ["--ref-stats", str(tmp_path / "pub.npz"), "--json", str(tmp_path / "a.json")]) == 0
    res = json.loads((tmp_path / "a.json").read_text())
    assert "kid_mean" not in res and "precision" not in res and "is_mean" in res  # mu/sigma only: FID and IS
    assert _run(base + ["--data", "digits", "--metrics", "fid,is", "--json", str(tmp_path / "b.json")]) == 0
    full = json.loads((tmp_path / "b.json").read_text())
    assert res["fid"] == pytest.approx(full["fid"], rel=1e-7)  # np.cov vs streamed float64 statistics
    assert not cache.exists()  # nothing computed, nothing cached
    with pytest.raises(ValueError, match="raw features"):
        _run(base + ["--ref-stats", str(tmp_path / "pub.npz"), "--metrics", "fid,kid"])


def test_fd_fid_against_published_stats(tmp_path):
    ext = get_extractor("digits")
    ref = load_images("digits", "heldout")
    f_ref = _published(tmp_path / "pub.npz", ref, ext)
    samples = load_images("digits", "train")[:200]
    with torch.no_grad():
        f = ext(samples).double().numpy()
    want = frechet_distance(f.mean(0), np.cov(f, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False))
    assert fd.fid(samples, str(tmp_path / "pub.npz"), features="digits") == pytest.approx(want, rel=1e-7)
    assert fd.fid(samples, ref, features=ext, cache=False) == pytest.approx(want, rel=1e-7)
    assert fd.metrics.frechet_distance is frechet_distance


def test_ref_stats_of_a_folder_are_computed_once_and_cached(tiny_checkpoint, tmp_path, cache, monkeypatch):
    folder = _digit_folder(tmp_path / "real")
    base = ["eval", "--checkpoint", tiny_checkpoint, "--sampler", "ddim", "--steps", "2", "--num", "6",
            "--batch-size", "6", "--no-progress", "--device", "cpu", "--ref-stats", str(folder)]
    assert _run(base + ["--json", str(tmp_path / "a.json")]) == 0
    ext = get_extractor("digits")
    cached = stats_cache_path(str(folder), ext, "all", 10_000)
    assert os.path.isfile(cached) and os.path.dirname(cached) == str(cache / "ref_stats")
    with torch.no_grad():
        direct = FeatureStats().update(ext(load_images(str(folder))))
    ref = reference_from(str(folder), ext)  # read back from the cache
    np.testing.assert_allclose(ref.mu, direct.mu, rtol=1e-12)
    assert ref.count == 24

    def fail(*a, **k):
        raise AssertionError("the folder was read again although its statistics are cached")

    monkeypatch.setattr("fastddpm.evaluate.load_images", fail)
    assert _run(base + ["--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["fid"] == b["fid"] and a["reference_count"] == 24
    # adding an image changes the folder: a new cache entry
    fd.to_pil(load_images("digits")[30:31])[0].save(folder / "999.png")
    assert stats_cache_path(str(folder), ext, "all", 10_000) != cached


def test_stats_only_needs_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "cifar_like.npz"
    argv = ["eval", "--checkpoint", str(tmp_path / "no-such-run"), "--data", "digits", "--part", "all",
            "--ref-stats", str(out), "--stats-only", "--no-progress", "--device", "cpu",
            "--json", str(tmp_path / "summary.json")]
    assert _run(argv) == 0
    assert "1797 images" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reference_count"] == 1797 and summary["features"] == "digits" and summary["dim"] == 64
    with np.load(out) as d:
        assert d["mu"].shape == (64,) and d["sigma"].shape == (64, 64)


def test_eval_features_inception_wiring(tiny_checkpoint, tmp_path, cache, monkeypatch):
    """--features inception end to end, with a randomly initialised network standing in for the weights."""
    from fastddpm import inception

    torch.manual_seed(0)
    net = inception.FIDInceptionV3().eval()
    monkeypatch.setattr(inception, "load_fid_inception", lambda *a, **k: net)
    monkeypatch.setattr(inception, "INPUT_SIZE", 75)  # the smallest input InceptionV3 takes: a fast CPU test
    folder = _digit_folder(tmp_path / "real", n=3)
    base = ["eval", "--checkpoint", tiny_checkpoint, "--no-progress", "--device", "cpu", "--features", "inception"]
    stats, out = tmp_path / "inc_stats.npz", tmp_path / "inc.json"
    assert _run(base + ["--data", str(folder), "--ref-stats", str(stats), "--stats-only", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dim"] == 2048
    with np.load(stats) as d:
        assert str(d["extractor"]) == "inception" and int(d["count"]) == 3
    # (FID's 2048-d eigendecompositions take ~10 s on a slow CPU: IS only; the FID math is tested elsewhere)
    assert _run(base + ["--ref-stats", str(stats), "--sampler", "ddim", "--steps", "2", "--num", "3",
                        "--batch-size", "3", "--metrics", "is", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["features"] == "inception" and res["reference_count"] == 3 and res["is_mean"] >= 1.0


def test_eval_inception_offline_names_the_weights(tiny_checkpoint, tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(Exception, match="inception-weights|weights_path"):
        _run(["eval", "--checkpoint", tiny_checkpoint, "--features", "inception", "--num", "2", "--no-progress"])
