"""Names shared by the library and its CLI, kept free of torch so that building the CLI parser stays fast."""
from __future__ import annotations

# the samplers `fastddpm.samplers.make_sampler` builds by name
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde", "unipc")
# the number of steps a sampler name gets by default (None: all T)
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20, "dpm++sde": 20, "dpm++3m": 20, "dpm++3m-sde": 20, "unipc": 10}
# ... and on the command line (`fastddpm sample` / `eval`), where DDPM is respaced to 100 steps: all
# 1000 of a 1000-step schedule cost 10x the time (minutes for 16 digits from the bundled model on a
# CPU) for no better digits-FID (README, "Sample quality against sampling steps": 11.5 at 1000, 9.6 at 100)
CLI_DEFAULT_STEPS = {**DEFAULT_STEPS, "ddpm": 100}
