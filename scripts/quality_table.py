"""The sampler table users choose from: digits-FD against model calls, fastddpm vs diffusers, one model.

    python scripts/quality_table.py                           # the default grid (see GRID), bundled model
    python scripts/quality_table.py --settings "fastddpm:unipc:tuned,diffusers:unipc-bh2-3:trailing" --calls 6,10
    python scripts/quality_table.py --settings fastddpm:ddpm:uniform --calls 1000 --cache-dir /tmp/qcache
    python scripts/quality_table.py --settings fastddpm:distilled:digits-distilled --calls 1,2,3,4   # students

Every setting is (library, sampler, spacing) at a number of *model calls* per image (counted honestly:
DPM-Solver++(2M)'s final call at t = 0 counts; UniPC's corrector reuses the next call and adds none).
For each of ``--seeds`` seeds it draws ``--num`` images from the same x_T (Philox seed s, image i the
same for every sampler and for the diffusers schedulers, which are driven through a small adapter
around the same model), rounds them to 8 bits, and scores them with the Frechet distance in the
64-d features of the digits classifier shipped with fastddpm (fastddpm.features, "digits-FD"), against
the whole digits set (1,797 images; FID's convention: the training set's statistics). The noise floor
is an exact copy of the data: ``--num`` digits drawn with replacement from the 1,797, scored the same
way. Reported: the mean over seeds and its spread (sd over seeds).

Results accumulate in ``<out-dir>/quality_table.json`` (a setting re-run replaces its old entry;
every entry records the command, the time and the seconds it took), from which ``quality_table.md``
and ``quality_table.svg`` (the plot) are regenerated. Expensive settings (DDPM-1000) can be cached as uint8
samples in ``--cache-dir`` and scored again later.
"""
from __future__ import annotations

import argparse
import html
import inspect
import math
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from fastddpm import build  # noqa: E402
from fastddpm import checkpoint as ckpt  # noqa: E402
from fastddpm.evaluate import load_images, reference_stats  # noqa: E402
from fastddpm.features import get_extractor  # noqa: E402
from fastddpm.fileio import atomic_write_json  # noqa: E402
from fastddpm.metrics import frechet_distance  # noqa: E402
from fastddpm.ops.philox import philox_normal  # noqa: E402

CALLS = (5, 6, 8, 10, 15, 20)


# ------------------------------------------------------------------------------ diffusers adapter
def diffusers_scheduler(name: str, spacing: str, betas: np.ndarray, prediction: str) -> Any:
    """A diffusers scheduler over `betas` by short name ("unipc-bh2-3", "dpm++2m", "dpm++3m", "sde-dpm++2m",
    "deis-3", "unipc-bh1-2", ...) and spacing ("trailing", "linspace", "leading", "karras", "lu", "lu-clip")."""
    import diffusers

    pred = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction]
    # thresholding with sample_max_value = 1 clamps x0-hat to [-1, 1]: fastddpm's clip_denoised=True (without
    # it, x0-hat = (x - sigma eps) / alpha at t = 999 of the cosine schedule amplifies the model's error 2e4x)
    kw: Dict[str, Any] = dict(num_train_timesteps=len(betas), trained_betas=betas.tolist(), prediction_type=pred,
                              thresholding=True, sample_max_value=1.0)
    if spacing == "karras":
        kw["use_karras_sigmas"] = True
    elif spacing.startswith("lu"):
        kw["use_lu_lambdas"] = True
    else:
        kw["timestep_spacing"] = spacing
    if spacing.endswith("-clip"):  # diffusers' advice for cosine schedules
        kw["lambda_min_clipped"] = -5.1
    if name.startswith("unipc"):
        _, bh, order = name.split("-")
        return diffusers.UniPCMultistepScheduler(solver_type=bh, solver_order=int(order), **kw)
    if name.startswith("deis"):
        return diffusers.DEISMultistepScheduler(solver_order=int(name.split("-")[1]), **kw)
    if name in ("dpm++2m", "dpm++3m", "sde-dpm++2m"):
        algo = "sde-dpmsolver++" if name.startswith("sde") else "dpmsolver++"
        return diffusers.DPMSolverMultistepScheduler(algorithm_type=algo, solver_order=3 if "3m" in name else 2, **kw)
    raise ValueError(f"unknown diffusers scheduler {name!r}")


@torch.no_grad()
def diffusers_sample(model: Any, scheduler: Any, x: torch.Tensor, calls: int, seed: int) -> Tuple[torch.Tensor, int]:
    """Run a diffusers scheduler from x_T with `calls` timesteps; (x_0, model calls made)."""
    scheduler.set_timesteps(calls)
    gen = torch.Generator().manual_seed(1000 + seed)
    x = x * scheduler.init_noise_sigma
    n = 0
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        out = model(scheduler.scale_model_input(x, t), tt)
        n += 1
        kw = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x, n


# ------------------------------------------------------------------------------ one setting
def x_T(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The x_T every sampler starts from for `seed` (fastddpm's Philox stream 1 at step 0)."""
    z = torch.zeros(1, dtype=torch.int64)
    return philox_normal(torch.tensor([seed]), shape, z, stream=1)


def fastddpm_sampler(name: str, spacing: str, calls: int, diffusion: Any, tuned: Dict[str, Any]) -> Any:
    """The fastddpm sampler of a setting: `calls` model calls, `spacing` (or the checkpoint's tuned schedule)."""
    from fastddpm.samplers import make_sampler

    if spacing.startswith("tuned"):  # "tuned", or a labelled variant ("tuned-keeplast") read from --tuned
        ts = (tuned.get(name) or {}).get(str(calls))
        if ts is None:
            raise KeyError(f"no tuned schedule for {name} at {calls} calls")
        return make_sampler(name, diffusion, steps=list(ts))
    return make_sampler(name, diffusion, steps=calls, spacing=spacing)


def draw(setting: str, calls: int, seed: int, num: int, model: Any, diffusion: Any, shape: Sequence[int],
         tuned: Dict[str, Any]) -> Tuple[np.ndarray, int, List[int]]:
    """uint8 NHWC samples of one setting and seed, the model calls per image it made, and its timesteps."""
    from fastddpm.images import to_uint8

    from fastddpm.precision import reduced_precision

    lib, name, spacing, *rest = setting.split(":")
    full = (num, *shape)
    dtype = rest[0] if rest else None  # e.g. fastddpm:unipc:tuned:bf16: the model calls in bf16
    if lib == "fastddpm" and name == "distilled":  # fastddpm:distilled:<student checkpoint>: student K = calls
        model_k, s = student(spacing, calls)
        model_k = reduced_precision(model_k, dtype)
        with torch.no_grad():
            x = s.sample(model_k, full, seed=seed)
        return to_uint8(x), s.num_steps, [int(t) for t in s.timesteps]
    if lib == "fastddpm":
        model = reduced_precision(model, dtype)
        s = fastddpm_sampler(name, spacing, calls, diffusion, tuned)
        with torch.no_grad():
            x = s.sample(model, full, seed=seed)
        made, timesteps = s.num_steps, [int(t) for t in s.timesteps]
    elif lib == "diffusers":
        betas = diffusion.schedule.betas.numpy()
        sch = diffusers_scheduler(name, spacing, betas, diffusion.prediction)
        x, made = diffusers_sample(reduced_precision(model, dtype), sch, x_T(seed, full), calls, seed)
        x, timesteps = x.clamp(-1, 1), [int(t) for t in sch.timesteps]
    else:
        raise ValueError(f"setting must start with fastddpm: or diffusers:, got {setting!r}")
    return to_uint8(x), made, timesteps


_STUDENTS: Dict[str, Any] = {}


def student(path: str, calls: int) -> Tuple[Any, Any]:
    """(model, sampler) of student `calls` of a distilled checkpoint (`fastddpm distill`; "digits-distilled":
    the bundled one), loaded once."""
    from fastddpm.student import student_for

    if path not in _STUDENTS:
        _STUDENTS[path] = build.load_model(path, device="cpu")
    model, diffusion, config = _STUDENTS[path]
    try:
        return student_for(model, diffusion, config, calls)
    except ValueError as e:
        raise KeyError(str(e)) from None


class Scorer:
    """digits-FD of uint8 NHWC images against the whole digits set."""

    def __init__(self) -> None:
        self.ext = get_extractor("digits")
        self.ref = reference_stats("digits", self.ext, part="all")

    def __call__(self, u8: np.ndarray) -> float:
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        feats = []
        with torch.no_grad():
            for i in range(0, x.shape[0], 1000):
                feats.append(self.ext(x[i:i + 1000]).double())
        f = torch.cat(feats).numpy()
        return float(frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.ref.mu, self.ref.sigma))


def floor_row(scorer: Scorer, num: int, seeds: Sequence[int]) -> Dict[str, Any]:
    """The noise floor: `num` digits drawn with replacement from the data, scored like samples."""
    from fastddpm.images import to_uint8

    data = to_uint8(load_images("digits", "all"))
    scores = []
    for s in seeds:
        idx = np.random.default_rng(s).integers(0, len(data), num)
        scores.append(scorer(data[idx]))
    return {"setting": "data:copy:-", "calls": 0, "scores": scores}


# ------------------------------------------------------------------------------ report
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++(2M)", "dpm++sde": "SDE-DPM-Solver++(2M)",
          "dpm++3m": "DPM-Solver++(3M)", "dpm++3m-sde": "SDE-DPM-Solver++(3M)", "unipc": "UniPC"}


# the two tuned variants: `tune-steps` free search (docs/quality_table_unipc_tuned.schedules.json) and with
# --keep-last (docs/..._keeplast...; the shipped schedules in fastddpm/assets: what `fastddpm sample` uses)
SPACING_LABELS = {"tuned": "tuned (free search)", "tuned-keeplast": "tuned, last t kept"}


def label(setting: str) -> str:
    lib, name, spacing, *rest = setting.split(":")
    if lib == "data":
        return "exact copy of the data (noise floor)"
    dtype = f", model in {rest[0]}" if rest else ""
    if lib == "fastddpm" and name == "distilled":
        return f"fastddpm distilled student ({os.path.basename(spacing.rstrip('/'))}){dtype}"
    if lib == "fastddpm":
        spacing = SPACING_LABELS.get(spacing, spacing)
        return f"fastddpm {LABELS.get(name, name)}, {spacing}{dtype}"
    return f"diffusers {name}, {spacing}{dtype}"


def summarize(entry: Dict[str, Any]) -> Tuple[float, float]:
    s = np.asarray(entry["scores"], dtype=np.float64)
    return float(s.mean()), float(s.std(ddof=1)) if s.size > 1 else 0.0


def load_results(path: str) -> Dict[str, Any]:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return {"entries": {}}


def save_results(results: Dict[str, Any], out_dir: str) -> None:
    atomic_write_json(os.path.join(out_dir, "quality_table.json"), results, indent=1)
    write_markdown(results, out_dir)
    plot(results, os.path.join(out_dir, "quality_table.svg"))


def merge_results(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One results dict from several runs' (made in parallel or one after another): an entry present in
    several parts keeps the union of their seeds (a later part's score wins for a seed both have)."""
    merged: Dict[str, Any] = {"entries": {}, "failed": {}}
    nums = set()
    for r in parts:
        for k, e in r["entries"].items():
            if not e["setting"].startswith("data:"):  # the floor row predates per-entry counts
                nums.add(e.get("num", r.get("meta", {}).get("num")))
            old = merged["entries"].get(k)
            if old is not None and "seeds" in e and "seeds" in old:
                by = dict(zip(old["seeds"], old["scores"]))
                by.update(zip(e["seeds"], e["scores"]))
                cmds = list(dict.fromkeys(old["command"].split(" ; ") + e["command"].split(" ; ")))
                e = dict(e, seeds=sorted(by), scores=[by[sd] for sd in sorted(by)], command=" ; ".join(cmds),
                         seconds=round(old.get("seconds", 0.0) + e.get("seconds", 0.0), 1))
            merged["entries"][k] = e
        merged["failed"].update(r.get("failed", {}))
        merged["meta"] = r.get("meta", merged.get("meta", {}))
    if len(nums) > 1:  # digits-FD is biased by 1/num: rows with different sample counts do not compare
        raise SystemExit(f"--merge: the files hold different samples per setting {sorted(map(str, nums))}")
    return merged


def _on(entry: Dict[str, Any], seeds: Sequence[int]) -> float:
    """Mean score of an entry over `seeds` (a paired comparison: the same x_T for every setting)."""
    by = dict(zip(entry.get("seeds", range(len(entry["scores"]))), entry["scores"]))
    return float(np.mean([by[s] for s in seeds]))


def _best(entries: List[Dict[str, Any]], lib: str, calls: int, seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    c = [e for e in entries if e["setting"].startswith(lib + ":") and e["calls"] == calls]
    return min(c, key=lambda e: _on(e, seeds)) if c else None


def render_tables(results: Dict[str, Any]) -> List[str]:
    """Markdown lines of the reference rows (noise floor, DDPM-1000), the table of every setting against
    model calls and the paired best-of-each-library comparison (also docs/samplers.md's generated section)."""
    entries = list(results["entries"].values())
    counts = sorted({e["calls"] for e in entries if 0 < e["calls"] <= 100})
    settings = sorted({e["setting"] for e in entries if 0 < e["calls"] <= 100},
                      key=lambda s: (not s.startswith("fastddpm"), s))
    by = {(e["setting"], e["calls"]): e for e in entries}
    full_seeds = max((len(e["scores"]) for e in entries), default=1)
    lines: List[str] = []
    ref = [e for e in entries if e["calls"] > 100 or e["setting"].startswith("data:")]
    for e in ref:
        m, sd = summarize(e)
        what = label(e["setting"]) if e["calls"] == 0 else f"{label(e['setting'])}, {e['calls']} calls"
        lines.append(f"- **{what}**: {m:.4f} +- {sd:.4f} (sd over {len(e['scores'])} seeds)")
    lines += ["", "| setting | " + " | ".join(f"{c} calls" for c in counts) + " |",
              "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for s in settings:
        cells = []
        for c in counts:
            e = by.get((s, c))
            if e is None:
                cells.append("-")
            else:
                k = len(e["scores"])
                cells.append(f"{summarize(e)[0]:.4f}" + ("" if k >= full_seeds else f" ({k} seed{'s' if k > 1 else ''})"))
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    ddpm = next((e for e in entries if e["setting"] == "fastddpm:ddpm:uniform" and e["calls"] == 1000), None)
    lines += ["", "Best of each library per count, compared on the seeds every setting at that count has (paired: the "
              "same x_T), with the ratio to DDPM-1000 where measured:", "",
              "| model calls | seeds | fastddpm best | diffusers best | fastddpm / diffusers |",
              "| ---: | --- | --- | --- | ---: |"]
    for c in counts:
        at = [e for e in entries if e["calls"] == c and not e["setting"].startswith("data:")]
        # the largest seed set covered by at least one setting of each library; compare only those
        seeds, best_at = [], at
        for cand in sorted({tuple(sorted(e.get("seeds", []))) for e in at}, key=len, reverse=True):
            cov = [e for e in at if set(cand) <= set(e.get("seeds", []))]
            if any(e["setting"].startswith("fastddpm:") for e in cov) and any(
                    e["setting"].startswith("diffusers:") for e in cov):
                seeds, best_at = list(cand), cov
                break
        if not seeds:
            continue
        at = best_at
        f, d = _best(at, "fastddpm", c, seeds), _best(at, "diffusers", c, seeds)

        def cell(e):
            if e is None:
                return "-"
            m = _on(e, seeds)
            r = f", {m / _on(ddpm, seeds):.2f}x DDPM-1000" if ddpm and set(seeds) <= set(ddpm.get("seeds", [])) else (
                f", {m / summarize(ddpm)[0]:.2f}x DDPM-1000 (its mean)" if ddpm else "")
            return f"{m:.4f} ({label(e['setting'])}{r})"
        ratio = f"{_on(f, seeds) / _on(d, seeds):.2f}" if f and d else "-"
        lines.append(f"| {c} | {','.join(map(str, seeds))} | {cell(f)} | {cell(d)} | {ratio} |")
    return lines


def write_markdown(results: Dict[str, Any], out_dir: str) -> None:
    entries = list(results["entries"].values())
    meta = results.get("meta", {})
    full_seeds = max((len(e["scores"]) for e in entries), default=1)
    lines = ["# Sample quality against model calls (bundled digits model)", "",
             f"digits-FD (Frechet distance in the 64-d features of fastddpm's digits classifier) against all "
             f"{meta.get('reference_count', 1797)} digits; {max((e.get('num', 0) for e in entries), default=0) or meta.get('num', '?')} "
             "samples per setting and seed, "
             f"mean of {full_seeds} seeds unless a cell says otherwise (the same x_T for every sampler at a seed); "
             "lower is better. Model calls per image are counted honestly (DPM-Solver++'s final call at t = 0 "
             "counts; UniPC's corrector reuses the next call). Machine and commands: see the end.", ""]
    lines += render_tables(results)
    failed = results.get("failed", {})
    if failed:
        lines += ["", "Settings that could not run (diffusers raised on this schedule; no score):", ""]
        lines += [f"- {label(k.split('@')[0])} at {k.split('@')[1]} calls: `{v}`" for k, v in sorted(failed.items())]
    lines += ["", "Runs that produced these entries (the table may combine several invocations of the same script "
              "on the same model, metric and seeds):", ""]
    for cmd in sorted({(c, e.get("machine", "")) for e in entries for c in e["command"].split(" ; ")}):
        lines.append(f"- `{cmd[0]}` ({cmd[1]})")
    lines += ["", "![digits-FD against model calls](quality_table.svg)"]
    with open(os.path.join(out_dir, "quality_table.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


SECTION_BEGIN = "<!-- quality-table:begin -->"
SECTION_END = "<!-- quality-table:end -->"


def doc_section(results: Dict[str, Any]) -> str:
    """docs/samplers.md's generated table section (between SECTION_BEGIN and SECTION_END, markers included)."""
    note = "<!-- generated by scripts/quality_table.py --doc from docs/quality_table.json; edit that, not this -->"
    return "\n".join([SECTION_BEGIN, note, ""] + render_tables(results) + ["", SECTION_END])


def update_doc(results: Dict[str, Any], path: str) -> None:
    """Replace the generated section of the markdown page at `path` by the rendering of `results`."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    a, b = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if a < 0 or b < a:
        raise SystemExit(f"--doc: {path} has no {SECTION_BEGIN} ... {SECTION_END} section")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:a] + doc_section(results) + text[b + len(SECTION_END):])


def plot(results: Dict[str, Any], path: str) -> str:
    """digits-FD (log scale) against model calls, one line per setting, as a self-contained SVG
    (no plotting dependency); reference rows (DDPM-1000, the noise floor) as horizontal lines."""
    entries = list(results["entries"].values())
    settings = sorted({e["setting"] for e in entries if 0 < e["calls"] <= 100},
                      key=lambda s: (not s.startswith("fastddpm"), s))
    curves = {s: sorted(((e["calls"], summarize(e)[0]) for e in entries if e["setting"] == s and 0 < e["calls"] <= 100))
              for s in settings}
    refs = [(label(e["setting"]) + (f", {e['calls']} calls" if e["calls"] else ""), summarize(e)[0])
            for e in entries if e["calls"] > 100 or e["setting"].startswith("data:")]
    ys = [y for c in curves.values() for _, y in c] + [y for _, y in refs]
    xs = [x for c in curves.values() for x, _ in c] or [5, 20]
    if not ys:
        return path
    W, H, L, R, Tp, B = 980, 560, 70, 330, 20, 50
    x0, x1 = min(xs), max(xs)
    y0, y1 = math.log10(max(min(ys), 1e-6)) - 0.05, math.log10(max(ys)) + 0.05

    def px(x: float) -> float:
        return L + (x - x0) / max(x1 - x0, 1) * (W - L - R)

    def py(y: float) -> float:
        return Tp + (y1 - math.log10(max(y, 1e-6))) / max(y1 - y0, 1e-9) * (H - Tp - B)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
              "#7f7f7f", "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<rect x="{L}" y="{Tp}" width="{W - L - R}" height="{H - Tp - B}" fill="none" stroke="#444"/>']
    for k in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** k
            if y0 <= math.log10(v) <= y1:
                out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>'
                           f'<text x="{L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for x in sorted(set(xs)):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{Tp}" y2="{H - B}" stroke="#eee"/>'
                   f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">model calls per image</text>')
    out.append(f'<text x="16" y="{(Tp + H - B) / 2}" transform="rotate(-90 16 {(Tp + H - B) / 2})" '
               'text-anchor="middle">digits-FD vs all digits (log; lower is better)</text>')
    legend_y = Tp + 8
    for i, (name, y) in enumerate(refs):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#000" '
                   f'stroke-dasharray="{"2,3" if i else "6,3"}"/>')
        out.append(f'<line x1="{W - R + 10}" x2="{W - R + 34}" y1="{legend_y}" y2="{legend_y}" stroke="#000" '
                   f'stroke-dasharray="{"2,3" if i else "6,3"}"/><text x="{W - R + 40}" y="{legend_y + 4}">'
                   f'{html.escape(name)} ({y:.3g})</text>')
        legend_y += 16
    for i, (s, pts) in enumerate(curves.items()):
        col = colors[i % len(colors)]
        dash = "" if s.startswith("fastddpm") else ' stroke-dasharray="5,3"'
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="1.6"{dash}/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{col}"/>' for x, y in pts]
        out.append(f'<line x1="{W - R + 10}" x2="{W - R + 34}" y1="{legend_y}" y2="{legend_y}" stroke="{col}" '
                   f'stroke-width="2"{dash}/><text x="{W - R + 40}" y="{legend_y + 4}">{html.escape(label(s))}</text>')
        legend_y += 16
    out.append("</svg>")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    return path


# ------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled digits model")
    ap.add_argument("--merge", default=None, metavar="JSON,JSON",
                    help="combine the entries of these quality_table.json files (runs made in parallel) into "
                         "--out-dir and regenerate the table and plot; samples nothing")
    ap.add_argument("--settings", default=None,
                    help="comma-separated lib:sampler:spacing (a setting may add :bf16 / :fp16 for the model calls)")
    ap.add_argument("--calls", default=",".join(map(str, CALLS)), help="comma-separated model calls per image")
    ap.add_argument("--num", type=int, default=2000, help="samples per setting and seed (default: 2000)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--floor", action="store_true", help="also (re)compute the noise floor row")
    ap.add_argument("--cache-dir", default=None, help="keep / reuse uint8 samples here (for DDPM-1000)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--tuned", default=None, metavar="JSON",
                    help="read the 'tuned' schedules from this sidecar file instead of the checkpoint's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", default=None, metavar="docs/samplers.md",
                    help="also rewrite that file's generated table section from the results")
    args = ap.parse_args(argv)
    if args.merge:
        merged = merge_results([load_results(part) for part in args.merge.split(",")])
        os.makedirs(args.out_dir, exist_ok=True)
        save_results(merged, args.out_dir)
        if args.doc:
            update_doc(merged, args.doc)
        return merged
    if not args.settings:
        ap.error("--settings is required (or --merge)")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    calls_list = [int(c) for c in args.calls.split(",")]
    model, diffusion, config = build.load_model(args.checkpoint, device="cpu")
    mc = config["model"]
    shape = (int(mc["in_channels"]), int(mc["image_size"]), int(mc["image_size"]))
    from fastddpm.tune import load_tuned_schedules

    sidecar = args.tuned or ckpt.resolve_checkpoint(args.checkpoint)
    tuned = load_tuned_schedules(sidecar)
    scorer = Scorer()
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "quality_table.json")
    cmd = "python scripts/quality_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s), shared"
    results = load_results(path)
    results["meta"] = {"num": args.num, "num_seeds": len(seeds), "seeds": seeds, "reference_count": scorer.ref.count,
                       "metric": "digits-FD, fastddpm.features digits classifier, reference = all digits"}
    if args.floor:
        e = floor_row(scorer, args.num, seeds)
        e.update(command=cmd, machine=machine, seconds=0.0, time=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        results["entries"]["data:copy:-@0"] = e
        print(f"floor: {summarize(e)[0]:.4f} +- {summarize(e)[1]:.4f}", flush=True)
        save_results(results, args.out_dir)
    # seed-outer: an interrupted run still leaves every setting with its first seeds (cells say how many)
    fresh = set()
    for seed in seeds:
        for setting in args.settings.split(","):
            for calls in calls_list:
                t0 = time.perf_counter()
                cache = (os.path.join(args.cache_dir, f"{setting.replace(':', '_')}_{calls}_{seed}_{args.num}.npz")
                         if args.cache_dir and ":tuned" not in setting and ":distilled:" not in setting
                         else None)  # a tuned schedule or a student may change
                try:
                    if cache and os.path.isfile(cache):
                        with np.load(cache) as d:
                            u8, made = d["images"], int(d["calls"])
                            timesteps = d["timesteps"].tolist() if "timesteps" in d else None
                    else:
                        if ":tuned" in setting:  # re-read: `fastddpm tune-steps` may be adding schedules meanwhile
                            tuned = load_tuned_schedules(sidecar)
                        u8, made, timesteps = draw(setting, calls, seed, args.num, model, diffusion, shape, tuned)
                        if cache:
                            os.makedirs(args.cache_dir, exist_ok=True)
                            np.savez(cache, images=u8, calls=made, timesteps=np.asarray(timesteps))
                except KeyError as e:
                    print(f"skip {setting} {calls}: {e}", flush=True)
                    continue
                except (IndexError, RuntimeError, ValueError) as e:  # a scheduler that breaks on this schedule
                    if not setting.startswith("diffusers:"):
                        raise
                    print(f"FAILED {setting} {calls}: {type(e).__name__}: {e}", flush=True)
                    results.setdefault("failed", {})[f"{setting}@{calls}"] = f"{type(e).__name__}: {e}"
                    save_results(results, args.out_dir)
                    continue
                score = scorer(u8)
                key = f"{setting}@{made}"
                if key not in fresh:  # a re-run replaces the old scores of its seeds and keeps the others
                    fresh.add(key)
                    old = results["entries"].get(key)
                    keep = ([(sd, sc) for sd, sc in zip(old.get("seeds", []), old["scores"]) if sd not in seeds]
                            if old and old.get("num") == args.num else [])
                    results["entries"][key] = {"setting": setting, "calls": made, "scores": [sc for _, sc in keep],
                                               "seeds": [sd for sd, _ in keep], "num": args.num,
                                               "command": (old["command"] + " ; " if keep else "") + cmd,
                                               "machine": machine, "seconds": 0.0}
                e = results["entries"][key]
                if timesteps is not None and len(timesteps) <= 100:  # what a tuned / spaced setting ran
                    e["timesteps"] = timesteps
                e["scores"].append(score)
                e["seeds"].append(seed)
                e["seconds"] = round(e["seconds"] + time.perf_counter() - t0, 1)
                e["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                if made != calls:
                    print(f"note: {setting} at --calls {calls} made {made} model calls per image", flush=True)
                print(f"{label(setting):>45} {made:>5} calls seed {seed}: {score:.4f} (mean so far "
                      f"{summarize(e)[0]:.4f}, {time.perf_counter() - t0:.0f} s)", flush=True)
                save_results(results, args.out_dir)
    if args.doc:
        update_doc(results, args.doc)
    return results


if __name__ == "__main__":
    main()
