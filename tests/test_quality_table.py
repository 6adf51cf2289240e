"""scripts/quality_table.py's bookkeeping: merging runs made in parallel or one after another."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("quality_table", os.path.join(ROOT, "scripts", "quality_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entry(setting, calls, seeds, scores, num=2000, cmd="run"):
    return {"setting": setting, "calls": calls, "seeds": seeds, "scores": scores, "num": num, "command": cmd,
            "seconds": 1.0}


def test_merge_keeps_the_union_of_seeds_and_the_later_score():
    qt = _script()
    a = {"entries": {"fastddpm:ddim:uniform@10": _entry("fastddpm:ddim:uniform", 10, [0, 1], [6.0, 7.0], cmd="a")}}
    b = {"entries": {"fastddpm:ddim:uniform@10": _entry("fastddpm:ddim:uniform", 10, [1, 2], [7.5, 8.0], cmd="b"),
                     "fastddpm:ddpm:uniform@1000": _entry("fastddpm:ddpm:uniform", 1000, [0], [1.7], cmd="b")}}
    m = qt.merge_results([a, b])
    e = m["entries"]["fastddpm:ddim:uniform@10"]
    assert e["seeds"] == [0, 1, 2] and e["scores"] == [6.0, 7.5, 8.0]
    assert e["command"] == "a ; b" and e["seconds"] == 2.0
    assert m["entries"]["fastddpm:ddpm:uniform@1000"]["scores"] == [1.7]
    assert qt.summarize(e)[0] == pytest.approx((6.0 + 7.5 + 8.0) / 3)


def test_merge_refuses_different_sample_counts():
    qt = _script()
    a = {"entries": {"x@5": _entry("fastddpm:ddim:uniform", 5, [0], [1.0], num=2000)}}
    b = {"entries": {"y@5": _entry("fastddpm:unipc:trailing", 5, [0], [1.0], num=500)}}
    with pytest.raises(SystemExit, match="different samples"):
        qt.merge_results([a, b])


def test_samplers_page_table_is_the_rendering_of_the_results_file():
    """docs/samplers.md's table section is generated from docs/quality_table.json (`--doc`), never hand-edited."""
    qt = _script()
    results = qt.load_results(os.path.join(ROOT, "docs", "quality_table.json"))
    with open(os.path.join(ROOT, "docs", "samplers.md"), encoding="utf-8") as fh:
        page = fh.read()
    assert qt.doc_section(results) in page, (
        "docs/samplers.md's quality table is stale: python scripts/quality_table.py --merge docs/quality_table.json "
        "--out-dir docs --doc docs/samplers.md")


def test_update_doc_replaces_only_the_section(tmp_path):
    qt = _script()
    results = {"entries": {"x@5": _entry("fastddpm:ddim:uniform", 5, [0], [3.25]),
                           "y@5": _entry("diffusers:ddim:uniform", 5, [0], [4.5])}}
    page = tmp_path / "page.md"
    page.write_text(f"# head\n\n{qt.SECTION_BEGIN}\nold\n{qt.SECTION_END}\n\ntail\n", encoding="utf-8")
    qt.update_doc(results, str(page))
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# head\n\n") and text.endswith("\n\ntail\n") and "old" not in text
    assert "| fastddpm DDIM, uniform | 3.2500 |" in text and text.count(qt.SECTION_BEGIN) == 1
    page.write_text("# no section\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="--doc"):
        qt.update_doc(results, str(page))


@pytest.mark.parametrize("dtype", ["", ":bf16"])
def test_draw_fastddpm_unipc_equals_diffusers_unipc_on_trailing_timesteps(dtype):
    """The adapter drives diffusers from the same x_T: fastddpm's UniPC and diffusers' UniPC (bh2, order 3)
    on the same trailing timesteps give the same 8-bit images (up to rare rounding flips), and each
    entry records the timesteps it ran. With ":bf16" both run the model calls in bf16 (the same bf16 model:
    the same images again), which differ from the fp32 ones."""
    pytest.importorskip("diffusers")
    import numpy as np
    import torch

    from fastddpm.build import load_model

    qt = _script()
    torch.set_num_threads(1)
    model, diffusion, config = load_model(None, device="cpu")
    shape = (config["model"]["in_channels"], config["model"]["image_size"], config["model"]["image_size"])
    a, made_a, ts_a = qt.draw("fastddpm:unipc:trailing" + dtype, 5, 0, 8, model, diffusion, shape, {})
    b, made_b, ts_b = qt.draw("diffusers:unipc-bh2-3:trailing" + dtype, 5, 0, 8, model, diffusion, shape, {})
    assert made_a == made_b == 5 and ts_a == ts_b == [999, 799, 599, 399, 199]
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    assert diff.max() <= 1 and diff.mean() < 0.01
    if dtype:
        fp32, _, _ = qt.draw("diffusers:unipc-bh2-3:trailing", 5, 0, 8, model, diffusion, shape, {})
        assert np.abs(fp32.astype(np.int64) - b.astype(np.int64)).max() > 1  # bf16 model calls: other images
        assert qt.label("diffusers:unipc-bh2-3:trailing:bf16") == "diffusers unipc-bh2-3, trailing, model in bf16"


def test_distill_speed_picks_the_fewest_calls_within_the_quality_bar():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "distill_speed", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                                      "distill_speed.py"))
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    e = lambda *s: {"scores": list(s)}  # noqa: E731
    entries = {"fastddpm:ddpm:uniform@1000": e(2.0, 2.0, 2.0),  # the bar at 1.1x: 2.2
               "fastddpm:distilled:digits-distilled@2": e(2.3, 2.3, 2.3),  # over the bar
               "fastddpm:distilled:digits-distilled@3": e(2.1, 2.15, 2.3),  # mean 2.183: under it
               "fastddpm:distilled:digits-distilled@4": e(1.9, 1.9, 1.9),
               "fastddpm:distilled:digits-distilled:bf16@4": e(2.0, 2.0, 2.0),
               "fastddpm:distilled:other@1": e(1.0, 1.0, 1.0),  # another student: not this one
               "fastddpm:unipc:trailing@5": e(1.0, 1.0, 1.0),  # not a student
               "diffusers:unipc-bh2-3:trailing@7": e(2.3, 2.3, 2.3),
               "diffusers:unipc-bh2-3:trailing@8": e(2.1, 2.1, 2.1),
               "diffusers:dpm++2m:trailing@8": e(2.0, 2.0, 2.0),  # same calls, better score
               "diffusers:deis-3:trailing@6": e(1.0, 1.0),  # fewer than 3 seeds
               "diffusers:unipc-bh2-3:trailing:bf16@8": e(2.15, 2.15, 2.15)}
    assert ds.pick(entries, "fp32", 1.1) == (("fastddpm:distilled:digits-distilled", 3, pytest.approx(6.55 / 3)),
                                             ("diffusers:dpm++2m:trailing", 8, 2.0))
    assert ds.pick(entries, "bf16", 1.1) == (("fastddpm:distilled:digits-distilled", 4, 2.0),
                                             ("diffusers:unipc-bh2-3:trailing", 8, 2.15))
    assert ds.pick(entries, "bf16", 1.0) == (("fastddpm:distilled:digits-distilled", 4, 2.0), None)


def test_distillation_page_tables_hold_the_results_files():
    """docs/distillation.md's student table cites docs/quality_table.json (mean, sd, seeds, bf16 column) and its
    speed table benchmarks/results/distill_speed_cpu.json, to the digits shown."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    entries = json.loads((root / "docs" / "quality_table.json").read_text())["entries"]
    text = (root / "docs" / "distillation.md").read_text(encoding="utf-8")
    ddpm = np.mean(entries["fastddpm:ddpm:uniform@1000"]["scores"])
    rows = re.findall(r"^\| (\d) \| \*\*([\d.]+)\*\* \+- ([\d.]+) \(([\d.]+)x\) \| ([\d. /]+) \| ([\d.]+) \|", text, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    for k, mean, sd, ratio, seeds, bf16 in rows:
        s = np.asarray(entries[f"fastddpm:distilled:digits-distilled@{k}"]["scores"])
        assert (mean, sd, ratio) == (f"{s.mean():.3f}", f"{s.std(ddof=1):.2f}", f"{s.mean() / ddpm:.2f}")
        assert seeds.strip() == " / ".join(f"{v:.2f}" for v in s)
        assert bf16 == f"{np.mean(entries[f'fastddpm:distilled:digits-distilled:bf16@{k}']['scores']):.3f}"
    speed = json.loads((root / "benchmarks" / "results" / "distill_speed_cpu.json").read_text())
    for row in speed["rows"]:
        cells = f"| {row['dtype']} | {row['fastddpm']['calls']} | {row['fastddpm']['score']:.3f} | " \
                f"{row['fastddpm']['images_per_s']} | {row['diffusers']['setting']}, {row['diffusers']['calls']} calls | " \
                f"{row['diffusers']['score']:.3f} | {row['diffusers']['images_per_s']} | **{row['speedup']}** |"
        assert cells in text, cells
