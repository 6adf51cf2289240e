"""Sample quality of a digits model against the sampler and its number of steps.

    python scripts/quality_vs_steps.py                  # the bundled model, defaults below
    python scripts/quality_vs_steps.py --checkpoint runs/digits --num 500 --nll-num 359

For each setting -- DDPM (1000 steps, and 100 respaced), DDIM (eta 0; 10, 20, 50), DPM-Solver++(2M)
(10, 20) and its stochastic form SDE-DPM-Solver++(2M) (20, 50) -- it draws ``--num`` samples (Philox seed ``--seed``, image i the same whatever the batch)
and reports, with the shipped digits classifier (fastddpm.features):

- digits-FID against the held-out 20% of the digits (359 images; fastddpm.features.digits_split),
  and KID; both are biased upwards at small sample sizes, so the table also has the "real digits"
  row: ``--num`` training digits (never seen by the classifier) scored exactly like the samples;
  that row is the floor the samples can reach at this sample size;
- the confidence rate (fraction with max class probability >= 0.9) relative to the held-out digits';
- class balance: the smallest and the largest class fraction (ideal 0.10 each);
- and the bits/dim of the first ``--nll-num`` held-out digits (full bound, T model calls per image),
  with its standard error.

Writes ``<out>/quality_vs_steps.json``, ``.md`` (the table) and ``.png`` (when matplotlib is
installed; the library itself never needs it). Every number comes from the run; three checks
(DPM-Solver++ 20 steps within 10% of DDPM-1000's digits-FID; confidence rate >= 0.9x real; every
class within 5%-15%) are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastddpm import build  # noqa: E402
from fastddpm import checkpoint as ckpt  # noqa: E402
from fastddpm.evaluate import evaluate_samples, load_images, nll_over_dataset, reference_stats, sample_batches  # noqa: E402
from fastddpm.features import get_extractor  # noqa: E402
from fastddpm.samplers import make_sampler as _make_sampler  # noqa: E402

SETTINGS = [("ddpm", 1000), ("ddpm", 100), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpm++", 10), ("dpm++", 20),
            ("dpm++sde", 20), ("dpm++sde", 50)]
LABEL = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++", "dpm++sde": "SDE-DPM-Solver++"}


def _display_path(path: str) -> str:
    root = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    p = os.path.abspath(path)
    return os.path.relpath(p, root) if p.startswith(root + os.sep) else p


def _row(name: str, steps, res: dict, ref_conf: float, seconds: float) -> dict:
    return {
        "setting": name,
        "steps": steps,
        "digits_fid": res["fid"],
        "kid": res["kid_mean"],
        "kid_std": res["kid_std"],
        "confidence_rate": res["confidence_rate"],
        "confidence_vs_real": res["confidence_rate"] / ref_conf,
        "class_fraction_min": res["class_fraction_min"],
        "class_fraction_max": res["class_fraction_max"],
        "class_fractions": res["class_fractions"],
        "seconds": round(seconds, 1),
    }


def write_outputs(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality_vs_steps.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    rows = report["rows"]
    lines = [
        "# Sample quality against sampling steps (bundled digits model)" if report["bundled"] else
        f"# Sample quality against sampling steps ({report['checkpoint']})",
        "",
        f"Produced by `{report['command']}` ({report['wall_seconds'] / 60:.1f} min on {report['machine']}). "
        f"{report['num']} samples per setting (seed {report['seed']}), scored with the shipped digits classifier "
        f"against the {report['reference_count']} held-out digits. Digits-FID and KID are biased upwards at this "
        "sample size: the *real digits* row scores random subsets of the same number of real training digits the "
        "same way; it is the floor, and its spread (+- one standard deviation over the subsets) is the noise of one "
        "digits-FID at this sample size. Confidence = fraction of images whose max class probability is >= 0.9, relative to the held-out "
        f"digits' {report['ref_confidence_rate']:.3f}. Class balance: smallest / largest class fraction (ideal 0.10).",
        "",
        "| setting | steps | digits-FID | KID | confidence vs real | class min | class max | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        fid = f"{r['digits_fid']:.2f}" + (f" +- {r['digits_fid_sd']:.2f}" if "digits_fid_sd" in r else "")
        lines.append(f"| {r['setting']} | {r['steps'] if r['steps'] is not None else '-'} | {fid} | "
                     f"{r['kid']:.2f} | {r['confidence_vs_real']:.3f} | {r['class_fraction_min']:.3f} | "
                     f"{r['class_fraction_max']:.3f} | {r['seconds'] if r['seconds'] else '-'} |")
    nll = report.get("nll")
    if nll:
        lines += ["", f"Bits/dim of the first {nll['num']} held-out digits (full bound, {nll['num_timesteps']} terms): "
                  f"**{nll['bpd']:.3f} +- {nll['stderr']:.3f}** (standard error; prior term {nll['prior_bpd']:.2e}, "
                  f"decoder term {nll['decoder_bpd']:.3f}; {nll['seconds']:.0f} s)."]
    t = report.get("targets", {})
    if t:
        lines += ["", "Checks (reported, not asserted):", ""]
        for k, v in t.items():
            verdict = f" -> **{'met' if v['met'] else 'not met'}**" if "met" in v else ""
            lines.append(f"- {v['text']}: {v['value']}{verdict}")
    if report.get("note"):
        lines += ["", report["note"]]
    if report.get("plot"):
        lines += ["", f"![quality vs steps]({os.path.basename(report['plot'])})"]
    with open(os.path.join(out_dir, "quality_vs_steps.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rows = [r for r in report["rows"] if r["steps"] is not None]
    real = next((r for r in report["rows"] if r["steps"] is None), None)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, ax, title in (("digits_fid", axes[0], "digits-FID (lower is better)"),
                           ("confidence_vs_real", axes[1], "confidence rate / real"),
                           ("class_fraction_min", axes[2], "class fraction: min and max")):
        for sampler, marker in (("DDPM", "o"), ("DDIM", "s"), ("DPM-Solver++", "^"), ("SDE-DPM-Solver++", "v")):
            rs = sorted((r for r in rows if r["setting"] == sampler), key=lambda r: r["steps"])
            if not rs:
                continue
            xs = [r["steps"] for r in rs]
            line, = ax.plot(xs, [r[key] for r in rs], marker=marker, label=sampler)
            if key == "class_fraction_min":
                ax.plot(xs, [r["class_fraction_max"] for r in rs], marker=marker, ls="--", color=line.get_color())
        if real is not None and key != "class_fraction_min":
            ax.axhline(real[key], color="gray", ls=":", label="real digits")
            if key == "digits_fid" and real.get("digits_fid_sd"):
                ax.axhspan(real[key] - real["digits_fid_sd"], real[key] + real["digits_fid_sd"], color="gray",
                           alpha=0.15)
        if key == "confidence_vs_real":
            ax.axhline(0.9, color="red", lw=0.8, ls="--", label="target 0.9")
        if key == "class_fraction_min":
            ax.axhspan(0.05, 0.15, color="green", alpha=0.08, label="target 5%-15%")
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 100, 1000])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['num']} samples per setting vs {report['reference_count']} held-out digits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled digits model")
    ap.add_argument("--num", type=int, default=300, help="samples per setting (default: 300)")
    ap.add_argument("--batch-size", type=int, default=300, help="images per batch (default: 300)")
    ap.add_argument("--nll-num", type=int, default=100,
                    help="held-out digits for bits/dim (default: 100; 0 skips; 359 = all)")
    ap.add_argument("--nll-batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-subsets", type=int, default=5,
                    help="random subsets of --num real training digits for the floor row (default: 5)")
    ap.add_argument("--settings", default=",".join(f"{s}:{n}" for s, n in SETTINGS),
                    help="comma-separated sampler:steps (default: all seven)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
    ap.add_argument("--note", default="", help="a sentence added to the markdown (e.g. which model this is)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default: 1; on a shared CPU, more threads than free cores makes "
                         "torch's CPU convolutions many times slower)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    settings = []
    for item in args.settings.split(","):
        name, steps = item.split(":")
        settings.append((name, int(steps)))
    model, diffusion, config = build.load_model(args.checkpoint, device="cpu")
    mc = config["model"]
    shape = (int(mc["in_channels"]), int(mc["image_size"]), int(mc["image_size"]))
    path = ckpt.resolve_checkpoint(args.checkpoint)
    ext = get_extractor("digits")
    ref = reference_stats("digits", ext, part="heldout")
    cmd = "python scripts/quality_vs_steps.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = {
        "checkpoint": _display_path(path),
        "bundled": os.path.abspath(path) == os.path.abspath(ckpt.BUNDLED_MODEL),
        "model_config": mc, "diffusion_config": config["diffusion"],
        "num": args.num, "seed": args.seed, "reference": "digits held-out 20% (fastddpm.features.digits_split)",
        "reference_count": ref.count, "ref_confidence_rate": ref.confidence_rate,
        "command": cmd, "machine": f"{platform.machine()} CPU, torch {torch.__version__}, "
                                   f"{torch.get_num_threads()} threads (shared)",
        "note": args.note, "rows": [], "wall_seconds": 0.0,
    }
    # the floor: random subsets of --num real training digits (the classifier never saw the held-out
    # ones; the diffusion model saw all), scored like the samples; their spread is the metric's noise
    train = load_images("digits", "train")
    rng = np.random.default_rng(args.seed)
    floor = []
    for _ in range(args.real_subsets):
        idx = torch.from_numpy(rng.choice(len(train), min(args.num, len(train)), replace=False))
        floor.append(evaluate_samples([train[idx]], ext, ref, metrics=("fid", "kid"), num=len(idx)))
    res = {k: float(np.mean([f[k] for f in floor])) for k in
           ("fid", "kid_mean", "confidence_rate", "class_fraction_min", "class_fraction_max")}
    res["kid_std"] = float(np.std([f["kid_mean"] for f in floor], ddof=1)) if len(floor) > 1 else 0.0
    res["class_fractions"] = np.mean([f["class_fractions"] for f in floor], axis=0).tolist()
    row = _row(f"real digits (train part, mean of {len(floor)} random subsets)", None, res, ref.confidence_rate, 0.0)
    row["digits_fid_sd"] = float(np.std([f["fid"] for f in floor], ddof=1)) if len(floor) > 1 else 0.0
    row["digits_fid_all"] = [f["fid"] for f in floor]
    report["rows"].append(row)
    out_dir = os.path.abspath(args.out_dir)
    for name, steps in settings:
        # the spacing these figures were measured with (2026-11-23): DPM-Solver++ and its SDE form were
        # time-quadratic then; make_sampler's defaults are now trailing (docs/quality_table.md)
        sampler = _make_sampler(name, diffusion, steps, spacing="quadratic" if name.startswith("dpm") else None)
        t0 = time.perf_counter()
        batches = sample_batches(model, sampler, args.num, args.batch_size, shape, seed=args.seed,
                                 progress=args.progress, num_classes=mc.get("num_classes"))
        res = evaluate_samples(batches, ext, ref, metrics=("fid", "kid"), num=args.num)
        row = _row(LABEL[name], sampler.num_steps, res, ref.confidence_rate, time.perf_counter() - t0)
        report["rows"].append(row)
        print(f"{row['setting']:>14} {row['steps']:>5}: digits-FID {row['digits_fid']:.2f}  KID {row['kid']:.2f}  "
              f"conf/real {row['confidence_vs_real']:.3f}  classes [{row['class_fraction_min']:.3f}, "
              f"{row['class_fraction_max']:.3f}]  {row['seconds']} s", flush=True)
        report["wall_seconds"] = time.perf_counter() - t_start
        write_outputs(report, out_dir)  # partial results survive an interruption
    if args.nll_num > 0:
        t0 = time.perf_counter()
        nll = nll_over_dataset(diffusion, model, "digits", part="heldout", num=min(args.nll_num, ref.count),
                               batch_size=args.nll_batch_size, seed=args.seed, progress=args.progress)
        nll["seconds"] = time.perf_counter() - t0
        report["nll"] = nll
        print(f"bits/dim of {nll['num']} held-out digits: {nll['bpd']:.3f} +- {nll['stderr']:.3f}", flush=True)

    by = {(r["setting"], r["steps"]): r for r in report["rows"]}
    targets = {}
    d1000, d20 = by.get(("DDPM", 1000)), by.get(("DPM-Solver++", 20))
    if d1000 and d20:
        ratio = d20["digits_fid"] / d1000["digits_fid"]
        targets["dpm20_vs_ddpm1000"] = {"text": "DPM-Solver++ 20 steps digits-FID / DDPM-1000 digits-FID <= 1.10",
                                        "value": round(ratio, 3), "met": bool(ratio <= 1.10)}
        sde20 = by.get(("SDE-DPM-Solver++", 20))
        if sde20:  # reported beside the target, which names the deterministic solver
            targets["sde_dpm20_vs_ddpm1000"] = {
                "text": "SDE-DPM-Solver++ 20 steps digits-FID / DDPM-1000 digits-FID (for comparison)",
                "value": round(sde20["digits_fid"] / d1000["digits_fid"], 3)}
    gen = [r for r in report["rows"] if r["steps"] is not None]
    if gen:
        worst = min(r["confidence_vs_real"] for r in gen)
        targets["confidence"] = {"text": "confidence rate >= 0.9x real, every setting (worst)",
                                 "value": round(worst, 3), "met": bool(worst >= 0.9)}
        if d20:
            targets["confidence_dpm20"] = {"text": "confidence rate >= 0.9x real, DPM-Solver++ 20",
                                           "value": round(d20["confidence_vs_real"], 3),
                                           "met": bool(d20["confidence_vs_real"] >= 0.9)}
        lo = min(r["class_fraction_min"] for r in gen)
        hi = max(r["class_fraction_max"] for r in gen)
        targets["class_balance"] = {"text": "every class between 5% and 15%, every setting (min, max)",
                                    "value": f"[{lo:.3f}, {hi:.3f}]", "met": bool(lo >= 0.05 and hi <= 0.15)}
    report["targets"] = targets
    report["wall_seconds"] = time.perf_counter() - t_start
    png = os.path.join(out_dir, "quality_vs_steps.png")
    if plot(report, png):
        report["plot"] = "quality_vs_steps.png"
    write_outputs(report, out_dir)
    print(f"wrote {out_dir}/quality_vs_steps.{{json,md{',png' if report.get('plot') else ''}}} "
          f"in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
