"""Every Python block of README.md runs as written, each in a fresh namespace (so a block that lacks an
import fails here), with two kinds of test-only rewrites, each listed in REWRITES: smaller sizes where
the block as written takes minutes on a CPU, and a local tiny diffusers pipeline in place of the hub
model id (the tests run offline)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = '"google/ddpm-cifar10-32"'

# block-identifying text -> [(as written, as run here)]; every pair must match its block
REWRITES = {
    "fd.NoiseSchedule.cosine(num_timesteps=1000)": [
        ("num_timesteps=1000", "num_timesteps=50"),  # nll_bpd makes T model calls
    ],
    "DDPMPipeline.from_pretrained": [
        (HUB_ID, "PIPELINE"),  # a tiny pipeline saved by the fixture
        ("steps=50, batch_size=64", "steps=5, batch_size=4"),
    ],
}


def python_blocks(text: str):
    """The ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _rewritten(block: str) -> str:
    for key, pairs in REWRITES.items():
        if key in block:
            for old, new in pairs:
                assert old in block, f"README block with {key!r} no longer contains {old!r}: update REWRITES"
                block = block.replace(old, new)
    return block


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                                 norm_eps=1e-6)
    path = tmp_path_factory.mktemp("pipe")
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(path)
    return str(path)


def test_readme_has_the_blocks_the_rewrites_name():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for key in REWRITES:
        assert any(key in b for b in blocks), f"no README python block contains {key!r}"


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs(index, tiny_pipeline, tmp_path, monkeypatch):
    block = python_blocks(README.read_text(encoding="utf-8"))[index]
    code = _rewritten(block).replace("PIPELINE", repr(tiny_pipeline))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace = {"__name__": f"readme_block_{index}"}  # fresh: the block brings its own imports
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if "FastSampler.from_diffusers" in block:  # the drop-in's images: NCHW in [-1, 1] at the pipeline's size
        images = namespace["images"]
        assert images.shape == (4, 3, 8, 8) and images.abs().max() <= 1 + 1e-6
