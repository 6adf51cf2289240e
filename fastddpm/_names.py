"""Names shared by the library and its CLI, kept free of torch so that building the CLI parser stays fast."""
from __future__ import annotations

# the samplers `fastddpm.samplers.make_sampler` builds by name
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde", "unipc")
# the samplers that take an `eta` (the stochasticity of DDIM, Song et al. 2021); the others refuse one
ETA_SAMPLERS = ("ddim",)
# the number of steps a sampler name gets by default (None: all T)
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20, "dpm++sde": 20, "dpm++3m": 20, "dpm++3m-sde": 20, "unipc": 10}
# the timestep spacing a sampler name gets by default (fastddpm.spacing.SPACINGS). Measured on the bundled
# digits model (docs/quality_table.md): with "trailing" (diffusers' spacing: the last step jumps from
# T/S - 1 to x0) UniPC scores 2-2.7x better than with "logsnr" at 5-8 model calls and equals diffusers'
# UniPC; time-quadratic spacing, the multistep solvers' class default (kept: it is what makes them good on
# exact Gaussian data), has the largest ODE error of the five spacings on this model (tune-steps' report).
# DDPM / DDIM keep "uniform". A checkpoint's tuned schedule (fastddpm tune-steps) takes precedence in the CLI.
# The SDE forms take "trailing" too (docs/samplers.md; digits-FD, 2,000 samples, mean of seeds 0-2,
# `python scripts/quality_table.py --settings fastddpm:dpm++sde:trailing,fastddpm:dpm++sde:quadratic,
# fastddpm:dpm++3m-sde:trailing,fastddpm:dpm++3m-sde:quadratic --calls 10,15,20 --seeds 0,1,2`):
# SDE-DPM-Solver++(2M) 2.75 vs quadratic's 4.18 at 10 calls (better on every seed), 2.85 vs 2.59 at 15 and
# 2.83 vs 2.70 at 20 (one noise draw moves a score by +-0.55 sd: scripts/sde_noise_spread.py);
# SDE-DPM-Solver++(3M) 2.34 vs 12.66 at 10, 2.65 vs 2.64 at 15 (seed 0 at 20: 2.48 vs 2.11).
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm++": "trailing", "dpm++sde": "trailing",
                   "dpm++3m": "trailing", "dpm++3m-sde": "trailing", "unipc": "trailing"}
# the spacings a sampler accepts by name (fastddpm.spacing.SPACINGS, kept here free of torch for the CLI)
SPACING_NAMES = ("uniform", "trailing", "quadratic", "logsnr", "karras")
# what `fastddpm sample` draws with when no --sampler / --steps is given (measured: docs/quality_table.md)
DEFAULT_SAMPLER = "unipc"
# ... and on the command line (`fastddpm sample` / `eval`), where DDPM is respaced to 100 steps: all
# 1000 of a 1000-step schedule cost 10x the time (minutes for 16 digits from the bundled model on a
# CPU) for no better digits-FID (docs/quality_vs_steps.md: 11.5 at 1000, 9.6 at 100)
CLI_DEFAULT_STEPS = {**DEFAULT_STEPS, "ddpm": 100}

# the entry of a checkpoint's config that marks a distilled student set (`fastddpm.distillation` writes it: the
# teacher, the model calls each student takes and their timesteps)
DISTILL_CONFIG_KEY = "distill"

# seconds a data-parallel process (`fastddpm train` / `sample` under torchrun) waits for its peers
DEFAULT_DDP_TIMEOUT = 300.0

# samplers whose output is a deterministic function of x_T (what `tune_timesteps` / `fastddpm tune-steps` tune)
DETERMINISTIC_SAMPLERS = ("ddim", "dpm++", "dpm++3m", "unipc")

# Below this many parameters a model runs fastest on one CPU thread: the work per op is too small to
# pay for waking and joining a second thread (benchmarks/bench_threads.py; results/threads_cpu.json:
# the bundled 0.7M-parameter model samples 3.3x slower on 2 threads than on one on a quiet 2-core
# machine, the 35.7M-parameter CIFAR-10 U-Net forward takes 0.70x (batch 2) / 0.56x (batch 8) of its
# one-thread time). The threshold sits between the two measured models. The CLI (--threads) and the
# Python API's sampling calls (fastddpm.threads) both use it.
SMALL_MODEL_PARAMS = 5_000_000
