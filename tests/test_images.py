"""Images out like a pipeline: one quantisation (fd.to_uint8 / to_pil / save_grid, the CLI), FastSampler's
progress bar (outside the captured graph), and fd.load for fastddpm checkpoints and diffusers folders."""
import contextlib

import numpy as np
import pytest
import torch

import fastddpm as fd
from fastddpm import checkpoint as ck
from fastddpm.images import make_grid


# ----------------------------------------------------------------------------- quantisation
def test_to_uint8_is_round_of_x_plus_1_times_127_5():
    vals = np.array([-2.0, -1.0, -0.999, -0.5, 0.0, 0.003, 0.5, 0.9999, 1.0, 1.7])
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, 1, 2, 5)
    want = np.round((np.clip(vals.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    assert fd.to_uint8(x).reshape(-1).tolist() == want.tolist()
    assert fd.to_uint8(x).shape == (1, 2, 5, 1) and fd.to_uint8(x).dtype == np.uint8
    # the levels the data loaders serve (u8 / 127.5 - 1) map back to themselves
    levels = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 127.5 - 1
    assert fd.to_uint8(levels).reshape(-1).tolist() == list(range(256))


def test_to_pil_modes_and_values():
    x = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ims = fd.to_pil(x)
    assert [im.mode for im in ims] == ["RGB", "RGB"] and ims[0].size == (4, 5)
    assert np.array_equal(np.asarray(ims[1]), fd.to_uint8(x)[1])
    gray = fd.to_pil(x[0, :1])  # one image [C, H, W] -> one PIL image
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), fd.to_uint8(x[:1, :1])[0, :, :, 0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        fd.to_pil(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="float tensor"):
        fd.to_uint8(torch.zeros(4, 4))


def test_save_grid_layout(tmp_path):
    from PIL import Image

    x = torch.rand(3, 1, 4, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    path = fd.save_grid(x, str(tmp_path / "g.png"), nrow=2, scale=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 7)  # padding 1, 2 rows of 2 columns
    u8 = fd.to_uint8(x)[..., 0]
    assert np.array_equal(grid[1:5, 1:7], u8[0]) and np.array_equal(grid[1:5, 8:14], u8[1])
    assert np.array_equal(grid[6:10, 1:7], u8[2]) and not grid[6:10, 8:14].any()
    with pytest.raises(ValueError, match="nrow"):
        make_grid(fd.to_uint8(x), nrow=0)


def test_one_definition_of_the_quantisation():
    import fastddpm.cli.sample as cli_sample
    import fastddpm.data as data
    import fastddpm.train as train
    from fastddpm import images

    assert not hasattr(data, "to_uint8") and not hasattr(data, "save_grid")
    assert train.save_grid is images.save_grid
    import ast

    tree = ast.parse(open(cli_sample.__file__).read())
    imported = {a.name for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "images" and n.level == 2 for a in n.names}
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"save_grid", "to_uint8", "grid_scale"} <= imported and not defined & {"save_grid", "to_uint8"}


# ----------------------------------------------------------------------------- progress bar
class _Eps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return torch.tanh(x) * self.w + t.float().view(-1, 1, 1, 1) * 1e-3


class _ReplayAPI:
    """Stand-in CUDA graph API: capture records the body, replay re-runs it (and logs)."""

    def __init__(self, log):
        self.log = log

    def side_stream(self, device):
        return None

    @contextlib.contextmanager
    def on_stream(self, stream):
        yield

    def fork(self, stream, device):
        pass

    def join(self, stream, device):
        pass

    def capture(self, fn, device):
        self.log.append("capture")
        log = self.log

        class Graph:
            def replay(self):
                log.append("replay")
                fn()

        return Graph()


@pytest.mark.parametrize("capture", ["none", "step", "loop"])
def test_fast_sampler_progress_bar(capture, capsys, monkeypatch):
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(50))
    sampler = fd.DDIMSampler(diff, steps=5)
    log = []
    api = None if capture == "none" else _ReplayAPI(log)
    fast = fd.FastSampler(_Eps(), sampler, 2, image_shape=(1, 4, 4), capture=capture, graph_api=api, progress=True)
    import tqdm.auto

    updates = []
    real = tqdm.auto.tqdm

    class Spy(real):
        def update(self, n=1):
            updates.append((n, list(log)))  # what the graph API had done when the bar moved
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    got = fast(seed=1)
    err = capsys.readouterr().err
    assert "5/5" in err
    assert sum(n for n, _ in updates) == 5
    if capture != "none":  # the bar moves after the capture, between replays on the host
        assert all("capture" in seen for _, seen in updates)
        assert [seen.count("replay") for _, seen in updates] == ([1, 2, 3, 4, 5] if capture == "step" else [1])
    quiet = fd.FastSampler(_Eps(), sampler, 2, image_shape=(1, 4, 4))
    torch.testing.assert_close(got, quiet(seed=1))


# ----------------------------------------------------------------------------- fd.load
def test_load_bundled_model_samples_like_the_sampler():
    pipe = fd.load(device="cpu")
    assert isinstance(pipe.unet, fd.UNet) and pipe.image_shape == (1, 8, 8)
    out = pipe(3, seed=2, sampler="ddim", num_inference_steps=4)
    assert len(out.images) == 3 and out.images[0].mode == "L" and out.images[0].size == (8, 8)
    with torch.no_grad():
        ref = fd.DDIMSampler(pipe.diffusion, steps=4).sample(pipe.unet, (3, 1, 8, 8), seed=2)
    x = pipe(3, seed=2, sampler="ddim", num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(out.images[1]), fd.to_uint8(ref)[1, :, :, 0])
    assert pipe(2, seed=2, sampler="ddim", num_inference_steps=4, output_type="np").images.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(1, output_type="latent")
    with pytest.raises(ValueError, match="sampler"):
        pipe(1, sampler="euler")


def test_load_run_directory_uses_its_newest_checkpoint(tmp_path):
    cfg = {"model": dict(image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                         attention_resolutions=[], dropout=0.0, groups=8),
           "diffusion": dict(schedule="linear", num_timesteps=30, prediction="eps", variance="fixed_small",
                             loss="simple")}
    torch.manual_seed(0)
    u = fd.UNet(**cfg["model"])
    ck.save_checkpoint(str(tmp_path), 1, cfg, u.state_dict(), u.state_dict())
    torch.manual_seed(1)
    u2 = fd.UNet(**cfg["model"])
    ck.save_checkpoint(str(tmp_path), 2, cfg, u2.state_dict(), u2.state_dict())
    pipe = fd.load(str(tmp_path), device="cpu")
    assert pipe.diffusion.num_timesteps == 30 and pipe.source.endswith("step_00000002")
    for k, v in u2.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[k], v)
    with pytest.raises(ck.CheckpointError, match="not found"):
        fd.load(str(tmp_path / "nope"))


# fd.load of a diffusers folder: tests/test_interop_schedulers.py::test_load_diffusers_folder_reproduces_its_scheduler
