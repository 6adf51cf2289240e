"""The FID InceptionV3 (fastddpm.inception) without its weights: the weight file's layout, pytorch-fid's
preprocessing, the TF pooling variants, the checksum-verified weight cache; the Frechet distance of
random features against scipy; features against pytorch-fid itself when both are available."""
import hashlib
import os

import numpy as np
import pytest
import torch

import fastddpm as fd
from fastddpm import inception as inc
from fastddpm.features import InceptionV3Features, get_extractor
from fastddpm.metrics import FeatureStats, frechet_distance


# ----------------------------------------------------------------------------- the weight file's layout
# Written from torchvision's Inception3 as pytorch-fid builds it (fid_inception_v3: aux_logits=False,
# num_classes=1008, Mixed_* replaced by the FID blocks, which keep torchvision's submodule names):
# every BasicConv2d is (conv: bias-free, bn: weight/bias/running_mean/running_var), listed here as
# name -> (in, out, kh, kw).
def _block_a(p, cin, pool):
    return {f"{p}.branch1x1": (cin, 64, 1, 1), f"{p}.branch5x5_1": (cin, 48, 1, 1), f"{p}.branch5x5_2": (48, 64, 5, 5),
            f"{p}.branch3x3dbl_1": (cin, 64, 1, 1), f"{p}.branch3x3dbl_2": (64, 96, 3, 3),
            f"{p}.branch3x3dbl_3": (96, 96, 3, 3), f"{p}.branch_pool": (cin, pool, 1, 1)}


def _block_c(p, c7):
    return {f"{p}.branch1x1": (768, 192, 1, 1), f"{p}.branch7x7_1": (768, c7, 1, 1), f"{p}.branch7x7_2": (c7, c7, 1, 7),
            f"{p}.branch7x7_3": (c7, 192, 7, 1), f"{p}.branch7x7dbl_1": (768, c7, 1, 1),
            f"{p}.branch7x7dbl_2": (c7, c7, 7, 1), f"{p}.branch7x7dbl_3": (c7, c7, 1, 7),
            f"{p}.branch7x7dbl_4": (c7, c7, 7, 1), f"{p}.branch7x7dbl_5": (c7, 192, 1, 7),
            f"{p}.branch_pool": (768, 192, 1, 1)}


def _block_e(p, cin):
    return {f"{p}.branch1x1": (cin, 320, 1, 1), f"{p}.branch3x3_1": (cin, 384, 1, 1),
            f"{p}.branch3x3_2a": (384, 384, 1, 3), f"{p}.branch3x3_2b": (384, 384, 3, 1),
            f"{p}.branch3x3dbl_1": (cin, 448, 1, 1), f"{p}.branch3x3dbl_2": (448, 384, 3, 3),
            f"{p}.branch3x3dbl_3a": (384, 384, 1, 3), f"{p}.branch3x3dbl_3b": (384, 384, 3, 1),
            f"{p}.branch_pool": (cin, 192, 1, 1)}


_CONVS = {
    "Conv2d_1a_3x3": (3, 32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (32, 64, 3, 3),
    "Conv2d_3b_1x1": (64, 80, 1, 1), "Conv2d_4a_3x3": (80, 192, 3, 3),
    **_block_a("Mixed_5b", 192, 32), **_block_a("Mixed_5c", 256, 64), **_block_a("Mixed_5d", 288, 64),
    "Mixed_6a.branch3x3": (288, 384, 3, 3), "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
    "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    **_block_c("Mixed_6b", 128), **_block_c("Mixed_6c", 160), **_block_c("Mixed_6d", 160), **_block_c("Mixed_6e", 192),
    "Mixed_7a.branch3x3_1": (768, 192, 1, 1), "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
    "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    **_block_e("Mixed_7b", 1280), **_block_e("Mixed_7c", 2048),
}


def _expected_layout():
    out = {}
    for name, (cin, cout, kh, kw) in _CONVS.items():
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{k}"] = (cout,)
    out["fc.weight"], out["fc.bias"] = (1008, 2048), (1008,)
    return out


def test_state_dict_has_every_key_and_shape_of_the_weight_file():
    expected = _expected_layout()
    assert len(_CONVS) == 94 and len(expected) == 94 * 5 + 2
    got = dict(inc.state_dict_layout())
    assert got == expected
    batches_tracked = [k for k in inc.FIDInceptionV3().state_dict() if k.endswith("num_batches_tracked")]
    assert len(batches_tracked) == 94  # present or absent in a file: both load


def test_batchnorm_eps_and_bias_free_convs():
    net = inc.FIDInceptionV3()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(bns) == len(convs) == 94
    assert all(b.eps == 1e-3 for b in bns) and all(c.bias is None for c in convs)


def test_load_weights_accepts_the_layout_and_refuses_others():
    src = inc.FIDInceptionV3()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = inc.FIDInceptionV3()
    inc.load_weights(dst, state)
    assert torch.equal(dst.Mixed_7c.branch_pool.conv.weight, src.Mixed_7c.branch_pool.conv.weight)
    with pytest.raises(ValueError, match="unexpected"):
        inc.load_weights(dst, {**state, "AuxLogits.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        inc.load_weights(dst, {k: v for k, v in state.items() if k != "fc.bias"})


# ----------------------------------------------------------------------------- preprocessing and pooling
def _bilinear_half_pixel(img, out):
    """Independent numpy bilinear resize with half-pixel centres (align_corners=False), edges clamped."""
    h, w = img.shape[-2:]

    def axis(n_in):
        src = (np.arange(out) + 0.5) * (n_in / out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[..., y0, :] * (1 - fy)[:, None] + img[..., y1, :] * fy[:, None]
    return top[..., x0] * (1 - fx) + top[..., x1] * fx


def test_preprocess_is_pytorch_fids_resize_then_2x_minus_1():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = inc.preprocess(x)
    assert got.shape == (2, 3, 299, 299)
    want = 2 * _bilinear_half_pixel(x.numpy(), 299) - 1
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_images_reach_the_network_as_pytorch_fid_reads_their_pngs(tmp_path):
    from PIL import Image

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    for i, im in enumerate(fd.to_pil(x)):
        im.save(tmp_path / f"{i}.png")
    # pytorch-fid: Image.open(path).convert("RGB") -> ToTensor (u8 / 255, CHW)
    read = np.stack([np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB")) for i in range(3)])
    want = torch.from_numpy(read).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(InceptionV3Features.to_unit_rgb(x), want)
    gray = x[:, :1]
    assert torch.equal(InceptionV3Features.to_unit_rgb(gray), InceptionV3Features.to_unit_rgb(gray.expand(-1, 3, -1, -1)))


def test_tf_average_pool_ignores_the_padding_and_7c_pools_with_max():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    pooled = inc._tf_avg_pool(x)
    assert pooled[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4  # 4 pixels inside the image, not 9
    assert pooled[0, 0, 1, 1] == x[0, 0, :3, :3].mean()
    net = inc.FIDInceptionV3()
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    # Mixed_7c's pool branch sees the 3x3 max: a net whose branch_pool conv sums its input channels
    blk = net.Mixed_7c.eval()
    y = torch.randn(1, 2048, 5, 5)
    with torch.no_grad():
        blk.branch_pool.conv.weight.zero_()
        blk.branch_pool.conv.weight[0, :, 0, 0] = 1.0
        blk.branch_pool.bn.running_mean.zero_()
        blk.branch_pool.bn.running_var.fill_(1 - 1e-3)
        blk.branch_pool.bn.weight.fill_(1.0)
        blk.branch_pool.bn.bias.zero_()
        out = blk(y)[:, 2048 - 192]
    want = torch.relu(torch.nn.functional.max_pool2d(y, 3, 1, 1).sum(1))
    torch.testing.assert_close(out, want[:, :, :], rtol=1e-4, atol=1e-3)


def test_extractor_shapes_batches_and_probs_with_random_weights(monkeypatch):
    monkeypatch.setattr(inc, "INPUT_SIZE", 75)  # the smallest input InceptionV3 takes: a fast CPU test
    torch.manual_seed(0)
    net = inc.FIDInceptionV3().eval()
    ext = InceptionV3Features(model=net, batch_size=2)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    f, p = ext.features_and_probs(x)
    assert f.shape == (3, 2048) and p.shape == (3, 1008)
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    with torch.no_grad():
        one = net.pool3(ext.to_unit_rgb(x[2:3]))
    torch.testing.assert_close(f[2:3], one, rtol=1e-4, atol=1e-5)  # batch split does not change a feature
    torch.testing.assert_close(ext.logits(x[:1]), one @ net.fc.weight.t(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the weight cache
def _fake_weights(path):
    path.write_bytes(b"not really inception weights " * 10)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_from_a_path_are_checksum_verified(tmp_path):
    digest = _fake_weights(tmp_path / "w.pth")
    assert inc.inception_weights(str(tmp_path / "w.pth"), sha256_prefix=digest[:8]) == str(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="SHA-256"):
        inc.inception_weights(str(tmp_path / "w.pth"))  # not the real file's 6726825d
    with pytest.raises(FileNotFoundError, match="weights_path"):
        inc.inception_weights(str(tmp_path / "missing.pth"))


def test_weights_download_once_into_the_hub_cache(tmp_path, monkeypatch):
    digest = _fake_weights(tmp_path / "src.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = (tmp_path / "src.pth").as_uri()  # urllib reads file:// URLs: torch.hub's downloader, offline
    with pytest.raises(FileNotFoundError, match="download"):
        inc.inception_weights(download=False, url=url, sha256_prefix=digest[:8])
    with pytest.raises(ValueError, match="checksum"):
        inc.inception_weights(url=url, sha256_prefix="00000000")
    assert not os.path.exists(inc.default_weights_path())  # a bad download is not cached
    path = inc.inception_weights(url=url, sha256_prefix=digest[:8])
    assert path == inc.default_weights_path() == str(tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_FILENAME)
    os.unlink(tmp_path / "src.pth")  # the second call uses the cache
    assert inc.inception_weights(url=url, sha256_prefix=digest[:8]) == path
    with pytest.raises(RuntimeError, match="could not download"):
        os.unlink(path)
        inc.inception_weights(url=url, sha256_prefix=digest[:8])


def test_get_extractor_inception_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights_path"):
        get_extractor("inception", download=False)


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_of_random_features_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((600, 96)) @ rng.standard_normal((96, 96)) * 0.3
    b = rng.standard_normal((500, 96)) * 1.2 + 0.4
    s1, s2 = FeatureStats().update(a), FeatureStats().update(b)
    np.testing.assert_allclose(s1.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    covmean = scipy_linalg.sqrtm(s1.sigma @ s2.sigma).real  # pytorch-fid's formula
    diff = s1.mu - s2.mu
    want = diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) == pytest.approx(want, rel=1e-7)


# ----------------------------------------------------------------------------- against pytorch-fid (weights needed)
def _weights_or_skip():
    path = os.environ.get("FASTDDPM_INCEPTION_WEIGHTS") or inc.default_weights_path()
    if not os.path.isfile(path):
        pytest.skip(f"FID InceptionV3 weights not available ({path}; set FASTDDPM_INCEPTION_WEIGHTS)")
    return path


def test_features_match_pytorch_fid():  # pragma: no cover - needs pytorch-fid, torchvision and the weights
    path = _weights_or_skip()
    pfid = pytest.importorskip("pytorch_fid.inception")
    if os.path.abspath(path) != os.path.abspath(inc.default_weights_path()):
        pytest.skip("pytorch-fid loads its weights from the torch hub cache only")
    ref = pfid.InceptionV3([3]).eval()
    ext = get_extractor("inception", weights_path=path, download=False)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = ref(ext.to_unit_rgb(x))[0].squeeze(3).squeeze(2)
    torch.testing.assert_close(ext(x), want, rtol=1e-4, atol=1e-4)
