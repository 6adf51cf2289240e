"""Names shared by the library and its CLI, kept free of torch so that building the CLI parser stays fast."""
from __future__ import annotations

# the samplers `fastddpm.samplers.make_sampler` builds by name
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde", "unipc")
# the number of steps a sampler name gets by default (None: all T)
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20, "dpm++sde": 20, "dpm++3m": 20, "dpm++3m-sde": 20, "unipc": 10}
# the timestep spacing a sampler name gets by default (fastddpm.spacing.SPACINGS; measured on the
# bundled digits model, docs/quality_table.md); a checkpoint's tuned schedule takes precedence in the CLI
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm++": "quadratic", "dpm++sde": "quadratic",
                   "dpm++3m": "quadratic", "dpm++3m-sde": "quadratic", "unipc": "quadratic"}
# the spacings a sampler accepts by name (fastddpm.spacing.SPACINGS, kept here free of torch for the CLI)
SPACING_NAMES = ("uniform", "trailing", "quadratic", "logsnr", "karras")
# what `fastddpm sample` draws with when no --sampler / --steps is given (measured: docs/quality_table.md)
DEFAULT_SAMPLER = "dpm++"
