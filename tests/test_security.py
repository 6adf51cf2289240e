"""Reading data and checkpoints never runs code from the file: one malicious file per loader."""
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fastddpm import build
from fastddpm import checkpoint as ckpt
from fastddpm.data import UnsafePickleError, load_cifar10, load_dataset, load_npz, safe_load_pickle


class _Boom:
    """Unpickling this runs os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str opcodes and numpy's globals under ``numpy.core``: the
    format of the real CIFAR-10 files (pickled by Python 2's cPickle, numpy 1.x)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_pickle(obj, core="numpy.core"):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", f"c{core}.multiarray\n".encode())


def _cifar_folder(d, n=3, py2=True, core="numpy.core"):
    """A CIFAR-10 folder in the real layout; returns (data [5n, 3072], labels)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    datas, labels = [], []
    dump = (lambda o: _py2_pickle(o, core)) if py2 else (lambda o: pickle.dumps(o, protocol=2))
    for b in range(1, 6):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n).tolist()
        (d / f"data_batch_{b}").write_bytes(dump({b"batch_label": b"training batch %d of 5" % b, b"labels": lab,
                                                  b"data": data, b"filenames": [b"x.png"] * n}))
        datas.append(data)
        labels += lab
    (d / "test_batch").write_bytes(dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels[:n],
                                         b"data": datas[0]}))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(dump({b"num_cases_per_batch": n, b"label_names": names, b"num_vis": 3072}))
    return np.concatenate(datas), labels


@pytest.mark.parametrize("py2,core", [(True, "numpy.core"), (True, "numpy._core"), (False, "numpy._core")])
def test_real_cifar_format_loads(tmp_path, py2, core):
    data, labels = _cifar_folder(tmp_path / "cifar-10-batches-py", py2=py2, core=core)
    ds = load_dataset(str(tmp_path))
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert ds.labels.tolist() == labels and ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert len(load_dataset(str(tmp_path), split="test")) == 3


def test_malicious_cifar_batch_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _cifar_folder(tmp_path / "c")
    (tmp_path / "c" / "data_batch_2").write_bytes(pickle.dumps({b"data": _Boom(marker), b"labels": []}))
    with pytest.raises(UnsafePickleError, match=r"data_batch_2: refused to unpickle the global posix\.system.*not loaded"):
        load_dataset(str(tmp_path / "c"))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    "builtins eval", "numpy.core.multiarray _reconstruct_subclass", "numpy testing", "numpy load",
])
def test_unpickler_refuses_other_globals(tmp_path, payload):
    module, name = payload.split()
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00.")
    with pytest.raises(UnsafePickleError, match=rf"data_batch_1: refused to unpickle the global {module}\.{name}"):
        safe_load_pickle(str(p))


@pytest.mark.parametrize("dtype", [object, [("a", "u1")], "U3"])
def test_unpickler_refuses_non_numeric_arrays(tmp_path, dtype):
    arr = np.array([1, 2, 3]).astype(dtype) if dtype != "U3" else np.array(["a", "b"])
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": arr}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"data_batch_1: refused to unpickle a numpy dtype"):
        safe_load_pickle(str(p))


def test_image_folder_with_stray_data_batch_file_is_not_cifar(tmp_path):
    from PIL import Image

    marker = tmp_path / "pwned"
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    (d / "data_batch_thumbnail").write_bytes(pickle.dumps(_Boom(marker)))
    ds = load_dataset(str(d))
    assert ds.images.shape == (2, 3, 4, 4) and ds.images[1].max() == 40
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"not a CIFAR-10 python batches folder \(needs batches\.meta"):
        load_cifar10(str(d))


def test_eval_data_folder_with_malicious_batch(tmp_path):
    """`fastddpm eval --data DIR` reads DIR with load_dataset: the same refusal, no code run."""
    from fastddpm.evaluate import load_images  # what `eval --data` reads its folder with

    marker = tmp_path / "pwned"
    _cifar_folder(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps(_Boom(marker)))
    (tmp_path / "c" / "data_batch_1").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UnsafePickleError, match="data_batch_1: refused"):
        load_images(str(tmp_path / "c"))
    with pytest.raises(UnsafePickleError, match="test_batch: refused"):
        load_dataset(str(tmp_path / "c"), split="test")
    assert not marker.exists()


def test_npz_with_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "x.npz"
    np.savez(p, images=np.array([_Boom(marker)], dtype=object))
    with pytest.raises(ValueError, match=r"x\.npz: cannot read the \.npz file.*allow_pickle"):
        load_npz(str(p))
    assert not marker.exists()


def test_reference_stats_npz_with_object_array_is_refused(tmp_path):
    from fastddpm.evaluate import ReferenceStats
    from fastddpm.metrics import load_stats

    marker = tmp_path / "pwned"
    p = tmp_path / "s.npz"
    np.savez(p, mu=np.array([_Boom(marker)], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="s.npz"):
        load_stats(str(p))
    with pytest.raises(ValueError, match="s.npz"):
        ReferenceStats.load(str(p))
    assert not marker.exists()


def _tiny_checkpoint(tmp_path):
    from fastddpm.train import TrainConfig, train

    cfg = TrainConfig(dataset="digits", base_channels=8, channel_mults=(1,), attention_resolutions=(), groups=4,
                      num_res_blocks=1, num_timesteps=50, steps=1, batch_size=4, warmup_steps=0, progress=False,
                      compile=False, out_dir=str(tmp_path / "run"))
    return train(cfg).checkpoint


def test_malicious_state_pt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _tiny_checkpoint(tmp_path)
    with open(os.path.join(path, "state.pt"), "wb") as f:
        pickle.dump({"step": 1, "x": _Boom(marker)}, f, protocol=2)
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_config_json_cannot_name_code(tmp_path):
    """The config is plain JSON fed to UNet(**kwargs): a value naming a callable stays a string."""
    path = _tiny_checkpoint(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["time_embedding"] = "os.system"
    open(cfg_path, "w").write(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="time_embedding"):
        build.load_model(path)


def test_safetensors_metadata_config_is_bounded(tmp_path):
    """A single .safetensors file carries its config as JSON metadata: absurd values are refused before
    any model is built."""
    path = _tiny_checkpoint(tmp_path)
    ck = ckpt.load_checkpoint(path, load_state=False)
    cfg = dict(ck.config, model=dict(ck.config["model"], base_channels=200000))
    f = ckpt.save_weights_file(str(tmp_path / "m.safetensors"), ck.ema, cfg)
    with pytest.raises(ckpt.CheckpointError, match=r"base_channels=200000 exceeds the bound 4096"):
        build.load_model(f)
    cfg = dict(ck.config, model="os.system('x')")
    f = ckpt.save_weights_file(str(tmp_path / "n.safetensors"), ck.ema, cfg)
    with pytest.raises(ckpt.CheckpointError, match="model config must be a JSON object"):
        build.load_model(f)
