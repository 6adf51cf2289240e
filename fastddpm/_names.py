"""Names shared by the library and its CLI, kept free of torch so that building the CLI parser stays fast."""
from __future__ import annotations

# the samplers `fastddpm.samplers.make_sampler` builds by name
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde")
# the number of steps a sampler name gets by default (None: all T). DDPM is respaced to 100 steps: all
# 1000 cost 10x the time (about 4 minutes for 16 digits from the bundled model on one CPU thread) for
# no better digits-FID (README, "Sample quality against sampling steps": 11.5 at 1000, 9.6 at 100).
DEFAULT_STEPS = {"ddpm": 100, "ddim": 50, "dpm++": 20, "dpm++sde": 20}
