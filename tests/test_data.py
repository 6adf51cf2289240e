"""fastddpm.data: each format from small synthetic files, values checked against the bytes written."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastddpm.data import ImageDataset, load_dataset, read_idx

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _rng(seed=0):
    return np.random.default_rng(seed)


def _expected(u8_nchw):
    return torch.from_numpy(u8_nchw).double() / 127.5 - 1.0


# ------------------------------------------------------------------ digits
def test_digits_builtin():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.channels == 1 and ds.image_size == 8 and ds.num_classes == 10
    x, y = ds.batch(torch.arange(len(ds)))
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # uint8 values are round(v * 255 / 16) of integers 0..16: exactly 17 levels
    levels = torch.unique(ds.images)
    expect = torch.from_numpy(np.rint(np.arange(17) * 255 / 16).astype(np.uint8))
    assert set(levels.tolist()) <= set(expect.tolist())
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_resize_matches_interpolate():
    ds8 = load_dataset("digits")
    ds16 = load_dataset("digits", image_size=16)
    ref = F.interpolate(ds8.images[:5].float(), size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(ds16.images[:5], ref.round().clamp(0, 255).to(torch.uint8))


# ------------------------------------------------------------------ npz
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz_layouts(tmp_path, layout):
    u8 = _rng().integers(0, 256, size=(5, 3, 6, 7), dtype=np.uint8)  # NCHW, non-square
    if layout == "nhwc":
        arr = u8.transpose(0, 2, 3, 1)
    elif layout == "nchw":
        arr = u8
    else:
        u8 = u8[:, :1]
        arr = u8[:, 0]
    p = tmp_path / "x.npz"
    np.savez(p, images=arr, labels=np.arange(5))
    ds = load_dataset(str(p))
    x, y = ds.batch(range(5))
    torch.testing.assert_close(x.double(), _expected(u8), atol=1e-6, rtol=0)
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_npz_first_array_and_no_labels(tmp_path):
    u8 = _rng(1).integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
    p = tmp_path / "y.npz"
    np.savez(p, arr_0=u8)
    ds = load_dataset(str(p))
    assert ds.labels is None and ds.num_classes is None and ds[0][1] == -1
    torch.testing.assert_close(ds[2][0].double(), _expected(u8.transpose(0, 3, 1, 2))[2], atol=1e-6, rtol=0)


def test_npz_errors(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, images=np.zeros((3, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"f\.npz.*uint8"):
        load_dataset(str(p))
    p2 = tmp_path / "empty.npz"
    np.savez(p2, images=np.zeros((0, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"empty\.npz.*empty"):
        load_dataset(str(p2))
    p3 = tmp_path / "trunc.npz"
    np.savez(p3, images=np.zeros((3, 4, 4, 3), dtype=np.uint8))
    p3.write_bytes(p3.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"trunc\.npz.*cannot read"):
        load_dataset(str(p3))
    with pytest.raises(ValueError, match="not found"):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", channels=2)


# ------------------------------------------------------------------ image folders
def _write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


def test_image_folder_recursive_with_classes(tmp_path):
    rng = _rng(2)
    imgs = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            a = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            _write_png(str(tmp_path / cls / "sub" / f"{i}.png"), a)
            imgs[f"{cls}/sub/{i}.png"] = (a, cls)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 6 and ds.channels == 3 and ds.classes == ["cat", "dog"]
    # sorted path order: cat/sub/0..2, dog/sub/0..2
    for k, (rel, (a, cls)) in enumerate(sorted(imgs.items())):
        x, y = ds[k]
        torch.testing.assert_close(x.double(), _expected(a.transpose(2, 0, 1)[None])[0], atol=1e-6, rtol=0)
        assert y == ds.classes.index(cls)


def test_image_folder_grayscale_jpg_flat_no_labels(tmp_path):
    a = np.full((5, 5), 200, dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(a).save(tmp_path / "b.png")
    ds = load_dataset(str(tmp_path))
    assert ds.channels == 1 and ds.labels is None
    # a constant image survives JPEG within one grey level
    assert (ds.images.int() - 200).abs().max() <= 1


def test_image_folder_resize_crop(tmp_path):
    a = _rng(3).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    _write_png(str(tmp_path / "a.png"), a)
    b = _rng(4).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    _write_png(str(tmp_path / "b.png"), b)
    ds = load_dataset(str(tmp_path), image_size=4)
    assert ds.images.shape == (2, 3, 4, 4)
    ref = np.asarray(Image.fromarray(a).crop((2, 0, 10, 8)).resize((4, 4), Image.BICUBIC, reducing_gap=None))
    assert torch.equal(ds.images[0], torch.from_numpy(ref.transpose(2, 0, 1).copy()))
    assert torch.equal(ds.images[1], torch.from_numpy(b.transpose(2, 0, 1).copy()))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(str(tmp_path))
    _write_png(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8))
    _write_png(str(tmp_path / "b.png"), np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png: mixed image sizes"):
        load_dataset(str(tmp_path))
    os.remove(tmp_path / "b.png")
    _write_png(str(tmp_path / "c.png"), np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"c\.png: mixed image channel counts"):
        load_dataset(str(tmp_path))
    ds = load_dataset(str(tmp_path), channels=3)  # conversion resolves it
    assert ds.images.shape == (2, 3, 4, 4)
    os.remove(tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"d\.png: cannot read"):
        load_dataset(str(tmp_path))


def test_image_folder_symlink_loops_are_walked_once(tmp_path):
    """`ln -s . d/x` (and a link to a parent) used to make the walk loop forever; each real directory
    and file is read once, and links leaving the folder are skipped with a warning."""
    import warnings

    d = tmp_path / "d"
    a = _rng(5).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    _write_png(str(d / "a.png"), a)
    _write_png(str(d / "sub" / "b.png"), a[::-1].copy())
    os.symlink(".", d / "x")                    # self loop
    os.symlink("..", d / "sub" / "up")          # loop through the parent
    os.symlink("sub", d / "again")              # a second name for a real directory
    os.symlink("a.png", d / "same.png")         # a second name for a real file
    outside = tmp_path / "outside"
    _write_png(str(outside / "o.png"), a)
    os.symlink(str(outside), d / "out")        # leaves the dataset root
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = load_dataset(str(d))
    assert len(ds) == 2 and ds.labels is None
    assert torch.equal(ds.images[0], torch.from_numpy(a.transpose(2, 0, 1).copy()))
    assert [str(x.message) for x in w if "outside" in str(x.message)], [str(x.message) for x in w]


# ------------------------------------------------------------------ CIFAR-10 batches
def test_cifar10_batches(tmp_path):
    rng = _rng(5)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    all_data, all_labels = [], []
    for b in (1, 2):
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        with open(d / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        all_data.append(data)
        all_labels += labels
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": all_data[0][:2], b"labels": all_labels[:2]}, f)
    names = [b"c%d" % i for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 3}, f)
    ds = load_dataset(str(tmp_path))  # finds the sub-folder
    assert len(ds) == 6 and ds.num_classes == 10 and ds.classes == [n.decode() for n in names]
    ref = np.concatenate(all_data).reshape(-1, 3, 32, 32)
    x, y = ds.batch(range(6))
    torch.testing.assert_close(x.double(), _expected(ref), atol=1e-6, rtol=0)
    assert y.tolist() == all_labels
    assert len(load_dataset(str(d), split="test")) == 2
    (d / "data_batch_3").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match=r"data_batch_3: cannot read"):
        load_dataset(str(d))


# ------------------------------------------------------------------ MNIST IDX
def _idx_bytes(arr):
    code = {np.uint8: 0x08}[arr.dtype.type]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = _rng(6)
    imgs = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(tmp_path / f"train-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(imgs))
    with opener(tmp_path / f"train-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(labels))
    for spec in (str(tmp_path), str(tmp_path / f"train-images-idx3-ubyte{suffix}")):
        ds = load_dataset(spec)
        x, y = ds.batch(range(4))
        torch.testing.assert_close(x.double(), _expected(imgs[:, None]), atol=1e-6, rtol=0)
        assert y.tolist() == [3, 1, 4, 1]
    assert load_dataset(str(tmp_path), image_size=14).images.shape == (4, 1, 14, 14)


def test_idx_truncated(tmp_path):
    imgs = np.zeros((4, 5, 5), np.uint8)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(_idx_bytes(imgs)[:-10])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: truncated IDX"):
        read_idx(str(p))
    q = tmp_path / "weird.bin"
    q.write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"weird\.bin: unrecognised"):
        load_dataset(str(q))


# ------------------------------------------------------------------ flips
def test_random_flip_batch_uses_generator():
    u8 = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3).repeat(50, 1, 1, 1)
    ds = ImageDataset(u8, random_flip=True)
    g = torch.Generator().manual_seed(0)
    x, _ = ds.batch(range(100), generator=g)
    flips = torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.5
    base = u8.float() / 127.5 - 1
    expect = torch.where(flips[:, None, None, None], base.flip(-1), base)
    assert torch.equal(x, expect)
    assert 20 < int(flips.sum()) < 80
    noflip = ImageDataset(u8, random_flip=False)
    assert torch.equal(noflip.batch(range(100))[0], base)
