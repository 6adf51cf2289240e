"""The README and the docs pages as a user reads them.

* Every Python block of README.md (and of the docs pages in PAGES) runs as written, each in a fresh
  namespace (so a block that lacks an import fails here), with two kinds of test-only rewrites, each
  listed in REWRITES: smaller sizes where the block as written takes minutes on a CPU, and a local tiny
  diffusers pipeline in place of the hub model id (the tests run offline).
* The README's headline table holds the figures of the results files it cites
  (docs/quality_table.json, benchmarks/results/*.json), formatted as the generated pages format them.
* Every relative link of the README and the docs pages resolves to a file of the repository.
"""
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "docs" / "samplers.md", ROOT / "docs" / "interop.md"]  # pages whose python blocks run
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


def _all_blocks():
    return [(page, i) for page in PAGES for i in range(len(python_blocks(page.read_text(encoding="utf-8"))))]


def _rewritten(block: str) -> str:
    for key, pairs in REWRITES.items():
        if key in block:
            for old, new in pairs:
                assert old in block, f"python block with {key!r} no longer contains {old!r}: update REWRITES"
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


@pytest.mark.parametrize("page,index", _all_blocks(), ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_python_block_runs(page, index, tiny_pipeline, tmp_path, monkeypatch):
    block = python_blocks(page.read_text(encoding="utf-8"))[index]
    code = _rewritten(block).replace("PIPELINE", repr(tiny_pipeline))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace = {"__name__": f"doc_block_{index}"}  # fresh: the block brings its own imports
    try:
        exec(compile(code, f"{page.name} python block {index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if "FastSampler.from_diffusers" in block:  # the drop-in's images: NCHW in [-1, 1] at the pipeline's size
        images = namespace["images"]
        assert images.shape == (4, 3, 8, 8) and images.abs().max() <= 1 + 1e-6


# ------------------------------------------------------------------------------ the headline table
def _headline_rows():
    """{first cell: [other cells]} of the table under the README's "What is measured" heading."""
    text = README.read_text(encoding="utf-8").split("## What is measured", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[0]) <= set("-:"):
            rows[re.sub(r"\s*\[\d\]$", "", cells[0])] = cells[1:]
    return rows


def _quality(key: str) -> float:
    entries = json.loads((ROOT / "docs" / "quality_table.json").read_text())["entries"]
    scores = entries[key]["scores"]
    assert len(scores) == 3, f"{key}: the headline cites 3 seeds"
    return sum(scores) / len(scores)


def test_readme_headline_table_holds_the_cited_results():
    """Each figure of the README's headline equals the results file it cites (4 decimals for digits-FD,
    report.py's format for the benchmarks), and the diffusers column is diffusers' best at that count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    entries = json.loads((ROOT / "docs" / "quality_table.json").read_text())["entries"]
    unet = json.loads((ROOT / "benchmarks" / "results" / "unet_cpu.json").read_text())["unet_cpu"]
    ddim = next(r for r in json.loads((ROOT / "benchmarks" / "results" / "sampling_cpu.json").read_text())["e2e_cpu"]
                if r["sampler"] == "ddim" and r["steps"] == 20 and r["batch"] == 8)
    expected = {}
    for calls in (6, 10, 20):
        best = min((k for k in entries if k.startswith("diffusers:") and k.endswith(f"@{calls}")), key=_quality)
        assert best == f"diffusers:unipc-bh2-3:trailing@{calls}"
        label = f"sample quality at {calls} model calls" + (" (digits-FD, lower is better)" if calls == 6 else "")
        ours = "fastddpm:unipc:tuned-keeplast" if calls != 20 else "fastddpm:unipc:trailing"  # the CLI's default
        expected[label] = [f"{_quality(f'{ours}@{calls}'):.4f}", f"{_quality(best):.4f}"]
    expected["sample quality of DDPM at 1,000 model calls, for reference"] = [
        f"{_quality('fastddpm:ddpm:uniform@1000'):.4f}", ""]
    expected["CPU: one U-Net forward, batch 8, median s"] = [
        report.fmt(unet["forward"]["fastddpm"]["median_s"]), report.fmt(unet["forward"]["diffusers"]["median_s"])]
    expected["CPU: one U-Net training step, batch 8, median s"] = [
        report.fmt(unet["train_step"]["fastddpm"]["median_s"]), report.fmt(unet["train_step"]["diffusers"]["median_s"])]
    expected["CPU: sampling end to end, DDIM 20 steps, batch 8, images/s"] = [
        report.fmt(ddim["fast_sampler"]["images_per_s"]), report.fmt(ddim["diffusers_pipeline"]["images_per_s"])]
    best3 = min((k for k in entries if k.startswith("diffusers:") and k.endswith("@3") and ":bf16" not in k), key=_quality)
    expected["sample quality at 3 model calls: the distilled student vs the best scheduler"] = [
        f"{_quality('fastddpm:distilled:digits-distilled@3'):.4f}", f"{_quality(best3):.4f}"]
    speed = json.loads((ROOT / "benchmarks" / "results" / "distill_speed_cpu.json").read_text())
    bf16 = next(r for r in speed["rows"] if r["dtype"] == "bf16")
    assert bf16["fastddpm"]["calls"] == 3 and bf16["diffusers"]["calls"] == 8  # what footnote 5 names
    expected["CPU: images/s at DDPM-1000-level quality (digits-FD within 1.1x), bf16"] = [
        str(bf16["fastddpm"]["images_per_s"]), str(bf16["diffusers"]["images_per_s"])]
    rows = _headline_rows()
    for label, cells in expected.items():
        assert rows.get(label) == cells, f"README headline row {label!r}: {rows.get(label)} != {cells}"
    assert rows["GPU: kernels, U-Net, sampling"] == ["not measured", "not measured"]
    assert not list((ROOT / "benchmarks" / "results").glob("gpu_*.json")), \
        "a GPU results file exists: put its figures in the README's headline"


# ------------------------------------------------------------------------------ links
@pytest.mark.parametrize("page", [README] + sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link {target!r} does not resolve"
