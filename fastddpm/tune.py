"""Timestep schedules tuned for one model (Align-Your-Steps-like search), stored beside its checkpoint.

`tune_timesteps(model, diffusion, "unipc", 10)` finds the `steps` timesteps at which a deterministic
sampler best reproduces a high-step solution of the same probability-flow ODE from the same x_T:

1. draw `num_samples` x_T (Philox seed `seed`) and solve each to x_0 with DPM-Solver++(2M) at
   `reference_steps` logSNR-spaced steps (the reference; the sampler's own error at that many steps
   is negligible next to a 5-20 step solver's);
2. start from the best built-in spacing (uniform, trailing, quadratic, logsnr, karras) by the
   objective: the mean squared error per pixel between the sampler's x_0 and the reference;
3. coordinate descent on the timesteps t_1..t_{S-1} (t_0 = T-1 stays: x_T is drawn there): move
   one timestep by a fraction of the gap to its neighbour, keep the move when the objective falls;
   halve the fraction when a whole sweep keeps nothing; stop after `max_rounds` fractions or
   `max_seconds`;
4. guard against fitting the tuning noise: score initial and tuned schedules on `val_samples`
   fresh x_T (seed + 1); the tuned one is returned only if it also wins there, else the initial one.

The search calls the model (steps x num_samples) per evaluation, so on a CPU it takes minutes for
the bundled 8x8 model at the defaults. Schedules are stored in a JSON sidecar beside the checkpoint
(``X.schedules.json`` for ``X.safetensors``, ``schedules.json`` in a checkpoint directory), written
atomically; `fastddpm sample` and `FastSampler.from_checkpoint` use them by default when present.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._names import DETERMINISTIC_SAMPLERS

__all__ = ["tune_timesteps", "TuneResult", "schedules_path", "load_tuned_schedules", "save_tuned_schedule",
           "tuned_timesteps", "SCHEDULES_FORMAT"]

SCHEDULES_FORMAT = "fastddpm-schedules"
SCHEDULES_VERSION = 1
# samplers whose output is a deterministic function of x_T (the ODE objective needs one)
DETERMINISTIC = DETERMINISTIC_SAMPLERS


@dataclass
class TuneResult:
    """What `tune_timesteps` found: the schedule and its objective (mean squared error per pixel
    against the reference) on the tuning and on the fresh validation samples, before and after."""

    sampler: str
    steps: int
    timesteps: List[int]
    initial_spacing: str
    initial_timesteps: List[int]
    objective: float
    initial_objective: float
    val_objective: float
    val_initial_objective: float
    accepted: bool
    evaluations: int
    seconds: float
    spacing_objectives: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _x0(model: Any, sampler: Any, xT_seed: int, n: int, shape: Sequence[int], batch_size: int) -> torch.Tensor:
    """The sampler's x_0 from the Philox x_T of images 0..n-1 of `xT_seed`, in batches."""
    out = []
    with torch.no_grad():
        for b0 in range(0, n, batch_size):
            b1 = min(n, b0 + batch_size)
            out.append(sampler.sample(model, (b1 - b0, *shape), seed=xT_seed, image_offset=b0).float())
    return torch.cat(out)


def tune_timesteps(model: Any, diffusion: Any, sampler: str = "unipc", steps: int = 10, *,
                   shape: Optional[Sequence[int]] = None, num_samples: int = 256, val_samples: int = 256,
                   reference_steps: int = 200, seed: int = 0, max_rounds: int = 4, max_seconds: float = 600.0,
                   batch_size: int = 512, init: Optional[Sequence[int]] = None,
                   cache: Optional[Dict[Any, torch.Tensor]] = None, keep_last: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> TuneResult:
    """Timesteps minimising `sampler`'s error at `steps` model calls against a `reference_steps` solution.

    Args:
        model: model(x, t) -> output (the trained network, eval mode).
        diffusion: its GaussianDiffusion.
        sampler: a deterministic sampler name: "ddim" (eta 0), "dpm++", "dpm++3m" or "unipc".
        steps: model calls per image (the schedule's length).
        shape: (C, H, W); default from model.in_channels / model.image_size.
        num_samples: x_T used by the search; val_samples: fresh x_T (seed + 1) for the overfitting check.
        reference_steps: DPM-Solver++(2M) logSNR steps of the reference solution.
        seed: Philox seed of the tuning x_T (validation: seed + 1).
        max_rounds: step fractions tried (1/2, 1/4, ...); max_seconds: time bound of the descent.
        batch_size: images per model call.
        init: a starting schedule (descending, `steps` long); default: the best built-in spacing.
        cache: a dict kept across calls to reuse the reference solutions (same model and diffusion).
        keep_last: do not move the last timestep (the level the final x0-hat is taken at is then the
            initial schedule's, e.g. trailing's T/S - 1: a quality choice, tuned only on the path to it).
        log: a callable taking progress lines (e.g. print).

    Returns:
        a TuneResult; `.timesteps` is the schedule to use (the initial one when tuning did not also
        improve the validation objective).
    """
    if sampler not in DETERMINISTIC:
        raise ValueError(f"sampler must be a deterministic sampler {DETERMINISTIC} (the objective is the error "
                         f"against the ODE solution from the same x_T), got {sampler!r}")
    T = int(diffusion.schedule.num_timesteps)
    _check_int("steps", steps, 2)
    if steps > T:
        raise ValueError(f"steps must be <= T = {T}, got {steps}")
    for name, v in (("num_samples", num_samples), ("val_samples", val_samples), ("reference_steps", reference_steps),
                    ("max_rounds", max_rounds), ("batch_size", batch_size)):
        _check_int(name, v, 1)
    if shape is None:
        try:
            shape = (int(model.in_channels), int(model.image_size), int(model.image_size))
        except AttributeError:
            raise ValueError("shape is required for a model without in_channels / image_size") from None
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    objective = _Objective(model, diffusion, sampler, tuple(shape), reference_steps, batch_size,
                           {} if cache is None else cache)
    objective.reference(seed, num_samples)  # computed (and memoised) once up front, before the search
    say(f"reference: {reference_steps}-step DPM-Solver++ on {num_samples} + {val_samples} x_T")
    init_name, start, spacing_obj = _initial_schedule(objective, steps, init, seed, num_samples, say)
    initial, initial_obj = list(start), objective(start, seed, num_samples)
    deadline = t_start + max_seconds
    ts, best = _descend(objective, list(start), initial_obj, steps, seed, num_samples, max_rounds, deadline,
                        keep_last, say)
    val_init = objective(initial, seed + 1, val_samples)
    val_tuned = objective(ts, seed + 1, val_samples) if ts != initial else val_init
    accepted = val_tuned < val_init
    say(f"validation on fresh x_T: {init_name} {val_init:.3e} -> tuned {val_tuned:.3e} "
        f"({'accepted' if accepted else 'rejected: keeping ' + init_name})")
    return TuneResult(sampler=sampler, steps=steps, timesteps=ts if accepted else initial, initial_spacing=init_name,
                      initial_timesteps=initial, objective=best if accepted else initial_obj,
                      initial_objective=initial_obj, val_objective=val_tuned if accepted else val_init,
                      val_initial_objective=val_init, accepted=accepted, evaluations=objective.evaluations,
                      seconds=round(time.perf_counter() - t_start, 1), spacing_objectives=spacing_obj)


class _Objective:
    """Mean squared error of `sampler`'s x_0 on timesteps `ts` against the reference ODE solution
    (`reference_steps` DPM-Solver++(2M) logSNR steps) from the same Philox x_T; memoised by value."""

    def __init__(self, model: Any, diffusion: Any, sampler: str, shape: Tuple[int, ...], reference_steps: int,
                 batch_size: int, cache: Dict[Any, Any]):
        self.model, self.diffusion, self.sampler, self.shape = model, diffusion, sampler, shape
        self.reference_steps, self.batch_size, self.cache = reference_steps, batch_size, cache
        self.evaluations = 0
        self._values: Dict[Tuple[Tuple[int, ...], int, int], float] = {}

    def reference(self, s: int, n: int) -> torch.Tensor:
        from .samplers import make_sampler

        key = ("reference", s, n, self.reference_steps, self.shape)
        if key not in self.cache:
            ref = make_sampler("dpm++", self.diffusion, steps=self.reference_steps, spacing="logsnr")
            self.cache[key] = _x0(self.model, ref, s, n, self.shape, self.batch_size)
        return self.cache[key]

    def __call__(self, ts: Sequence[int], s: int, n: int) -> float:
        from .samplers import make_sampler

        key = (tuple(ts), s, n)
        if key not in self._values:
            self.evaluations += 1
            x = _x0(self.model, make_sampler(self.sampler, self.diffusion, steps=list(ts)), s, n, self.shape,
                    self.batch_size)
            self._values[key] = float(((x - self.reference(s, n)) ** 2).mean())
        return self._values[key]


def _initial_schedule(objective: _Objective, steps: int, init: Optional[Sequence[int]], seed: int, n: int,
                      say: Callable[[str], None]) -> Tuple[str, List[int], Dict[str, float]]:
    """The descent's start: `init` when given, else the built-in spacing with the lowest objective
    (name, timesteps, and each distinct spacing's objective)."""
    from .samplers import _resolve_timesteps, make_sampler
    from .spacing import SPACINGS

    if init is not None:
        start = _resolve_timesteps(int(objective.diffusion.schedule.num_timesteps), init, allow_none=False)
        if len(start) != steps:
            raise ValueError(f"init must hold {steps} timesteps, got {len(start)}")
        return "init", start, {}
    cands: Dict[str, Tuple[int, ...]] = {}
    spacing_obj: Dict[str, float] = {}
    for sp in SPACINGS:
        ts = make_sampler(objective.sampler, objective.diffusion, steps=steps, spacing=sp).timesteps.tolist()
        if tuple(ts) not in cands.values():
            cands[sp] = tuple(ts)
            spacing_obj[sp] = objective(ts, seed, n)
            say(f"  {sp:>9}: {spacing_obj[sp]:.3e}")
    name = min(spacing_obj, key=spacing_obj.get)
    return name, list(cands[name]), spacing_obj


def _descend(objective: _Objective, ts: List[int], best: float, steps: int, seed: int, n: int, max_rounds: int,
             deadline: float, keep_last: bool, say: Callable[[str], None]) -> Tuple[List[int], float]:
    """Coordinate descent: move one timestep at a time by a fraction of its gap to a neighbour (1/2, then halved
    after a round without improvement), keeping the first move that lowers the objective."""
    frac = 0.5
    for rnd in range(max_rounds):
        improved = False
        for i in range(1, steps - 1 if keep_last else steps):
            if time.perf_counter() > deadline:
                break
            upper = ts[i - 1]  # strictly below the previous timestep
            lower = ts[i + 1] if i + 1 < steps else -1
            for direction in (-1, 1):
                gap = (ts[i] - lower) if direction < 0 else (upper - ts[i])
                cand_t = ts[i] + direction * max(1, int(round(frac * gap)))
                if not lower < cand_t < upper:
                    continue
                cand = ts[:i] + [cand_t] + ts[i + 1:]
                v = objective(cand, seed, n)
                if v < best:
                    ts, best, improved = cand, v, True
                    break
        say(f"  round {rnd + 1} (fraction {frac:g}): {best:.3e} {ts}")
        if time.perf_counter() > deadline:
            break
        if not improved:
            frac /= 2
    return ts, best


# ------------------------------------------------------------------------------ storage
def schedules_path(checkpoint_path: str) -> str:
    """Where the tuned schedules of a checkpoint live: ``X.schedules.json`` beside a ``X.safetensors``
    file, ``schedules.json`` inside a checkpoint directory (a path that already ends in
    ``.schedules.json`` is the sidecar itself)."""
    if checkpoint_path.endswith(".schedules.json"):
        return checkpoint_path
    if os.path.isdir(checkpoint_path):
        return os.path.join(checkpoint_path, "schedules.json")
    return os.path.splitext(checkpoint_path)[0] + ".schedules.json"


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {"format": SCHEDULES_FORMAT, "version": SCHEDULES_VERSION, "schedules": {}}
    from .jsonio import load_file

    try:
        data = load_file(path)
    except ValueError as e:
        raise ValueError(f"{e}: unreadable tuned-schedule file; delete it or re-run `fastddpm tune-steps`") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULES_FORMAT or not isinstance(data.get("schedules"), dict):
        raise ValueError(f"{path}: not a fastddpm tuned-schedule file (format {SCHEDULES_FORMAT!r})")
    for sampler, by_steps in data["schedules"].items():
        if not isinstance(by_steps, dict):
            raise ValueError(f"{path}: schedules[{sampler!r}] must be an object {{steps: entry}}, got "
                             f"{type(by_steps).__name__}; delete the file or re-run `fastddpm tune-steps`")
        for steps, entry in by_steps.items():
            _check_entry(entry, f"{path}: schedules[{sampler!r}][{steps!r}]", steps)
    return data


def _check_entry(entry: Any, where: str, steps: str) -> None:
    """ValueError naming `where` unless `entry` holds "timesteps": `steps` distinct descending ints >= 0."""
    hint = "; delete the file or re-run `fastddpm tune-steps`"
    if not (steps.isdigit() and 0 < len(steps) <= 9 and int(steps) > 0):
        raise ValueError(f"{where}: the key must be a positive step count, got {steps!r}{hint}")
    ts = entry.get("timesteps") if isinstance(entry, dict) else None
    if not isinstance(ts, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        raise ValueError(f"{where}: must be an object whose 'timesteps' is a list of ints{hint}")
    if len(ts) != int(steps):
        raise ValueError(f"{where}: holds {len(ts)} timesteps for {steps} steps{hint}")
    if any(t < 0 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{where}: timesteps must be distinct, descending and >= 0, got {ts}{hint}")


def load_tuned_schedules(checkpoint_path: str) -> Dict[str, Dict[str, List[int]]]:
    """{sampler name: {str(steps): descending timesteps}} stored with a checkpoint ({} when none); a file
    whose entries are not `steps` distinct descending ints is refused (ValueError naming it)."""
    data = _read(schedules_path(checkpoint_path))
    return {k: {s: [int(t) for t in v["timesteps"]] for s, v in d.items()} for k, d in data["schedules"].items()}


def tuned_timesteps(checkpoint_path: str, sampler: str, steps: int,
                    num_timesteps: Optional[int] = None) -> Optional[List[int]]:
    """The tuned schedule stored for (sampler, steps) with a checkpoint, or None; with `num_timesteps`, a
    stored timestep >= num_timesteps is refused (ValueError naming the file)."""
    ts = load_tuned_schedules(checkpoint_path).get(sampler, {}).get(str(int(steps)))
    if ts is not None and num_timesteps is not None and ts[0] >= num_timesteps:
        raise ValueError(f"{schedules_path(checkpoint_path)}: schedules[{sampler!r}][{str(int(steps))!r}] holds "
                         f"timestep {ts[0]}, beyond this model's {num_timesteps} timesteps; delete the file or "
                         "re-run `fastddpm tune-steps`")
    return ts


def save_tuned_schedule(checkpoint_path: str, result: TuneResult, extra: Optional[Dict[str, Any]] = None) -> str:
    """Add (or replace) `result`'s schedule in the checkpoint's sidecar file, atomically; returns its path."""
    from .fileio import atomic_write_json

    path = schedules_path(checkpoint_path)
    data = _read(path)
    entry = {"timesteps": [int(t) for t in result.timesteps], "tuning": result.to_dict()}
    if extra:
        entry.update(extra)
    data["schedules"].setdefault(result.sampler, {})[str(result.steps)] = entry
    atomic_write_json(path, data, indent=1)
    return path


def sampler_for_checkpoint(checkpoint_path: str, diffusion: Any, name: Optional[str] = None,
                           steps: Optional[int] = None, spacing: Optional[str] = None, eta: float = 0.0) -> Any:
    """The sampler `fastddpm sample` uses: `name` (default DEFAULT_SAMPLER) at `steps` (default
    DEFAULT_STEPS[name]) on the checkpoint's tuned schedule for (name, steps) when one is stored and
    `spacing` is None or "tuned", else on `spacing` (default DEFAULT_SPACING[name]).

    `spacing="tuned"` without a stored schedule raises ValueError. The returned sampler's `.spacing`
    says which was used ("tuned" for a stored schedule).
    """
    from ._names import DEFAULT_SAMPLER, DEFAULT_STEPS
    from .samplers import make_sampler

    name = name or DEFAULT_SAMPLER
    if steps is None:
        steps = DEFAULT_STEPS.get(name)
    if spacing in (None, "tuned") and steps is not None:
        ts = tuned_timesteps(checkpoint_path, name, steps, int(diffusion.num_timesteps))
        if ts is not None:
            s = make_sampler(name, diffusion, steps=ts, eta=eta)
            s.spacing = "tuned"
            return s
        if spacing == "tuned":
            raise ValueError(f"spacing='tuned': {schedules_path(checkpoint_path)} holds no schedule for {name} at "
                             f"{steps} steps (run `fastddpm tune-steps --sampler {name} --steps {steps}`)")
    return make_sampler(name, diffusion, steps=steps, eta=eta, spacing=spacing)
