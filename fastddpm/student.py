"""Few-call students (`fastddpm.distillation`): one network per number of model calls K, held together.

A distilled checkpoint is an ordinary fastddpm checkpoint whose config has a "distill" entry
({"calls": {"K": [its K timesteps, descending]}, "teacher": ..., "method": ...}) and whose weights are
a :class:`StudentSet`: the teacher's U-Net architecture once per K (state-dict keys ``students.<K>.``).
Student K samples with deterministic DDIM (eta = 0) at its own K timesteps: the same coefficient table,
fused `sampler_step` op and `FastSampler` as every other sampler, so every kernel speed-up applies.

This module holds the container and the lookups that loading needs; the training is in
`fastddpm.distillation`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ._names import DISTILL_CONFIG_KEY

__all__ = ["StudentSet", "is_distilled", "distilled_calls", "student_timesteps_of", "check_calls", "student_for",
           "student_prediction_of", "ddim_sampler"]


class StudentSet(torch.nn.Module):
    """One model per number of calls K: ``students[str(K)]``.

    Args:
        students: {K: model}; each model has the teacher's call signature model(x, t, **kwargs).
    """

    def __init__(self, students: Mapping[int, torch.nn.Module]):
        super().__init__()
        if not students:
            raise ValueError("students must hold at least one model")
        self.students = torch.nn.ModuleDict({str(int(k)): m for k, m in sorted(students.items())})
        first = next(iter(self.students.values()))
        for attr in ("in_channels", "image_size", "num_classes", "out_channels"):
            if hasattr(first, attr):
                setattr(self, attr, getattr(first, attr))

    @property
    def calls(self) -> List[int]:
        """The K this set holds, ascending."""
        return sorted(int(k) for k in self.students)

    def for_calls(self, calls: int) -> torch.nn.Module:
        """The student that samples in `calls` model calls (ValueError naming the counts held otherwise)."""
        check_calls(calls, self.calls)
        return self.students[str(int(calls))]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - guidance only
        raise TypeError("a StudentSet is not called directly: pick one student with .for_calls(K)")


def is_distilled(config: Optional[Mapping[str, Any]]) -> bool:
    """Whether a checkpoint config is a distilled student set."""
    return isinstance(config, Mapping) and isinstance(config.get(DISTILL_CONFIG_KEY), Mapping)


def distilled_calls(config: Mapping[str, Any]) -> List[int]:
    """The model-call counts a distilled checkpoint holds, ascending."""
    return sorted(int(k) for k in config[DISTILL_CONFIG_KEY]["calls"])


def check_calls(calls: Any, available: Sequence[int]) -> int:
    """`calls` as an int when the student set holds it; ValueError naming the counts it has otherwise."""
    if isinstance(calls, bool) or not isinstance(calls, int) or int(calls) not in available:
        have = ", ".join(str(k) for k in available)
        raise ValueError(f"steps must be one of the model-call counts this distilled checkpoint holds ({have}), "
                         f"got {calls!r}")
    return int(calls)


def student_timesteps_of(config: Mapping[str, Any], calls: int) -> List[int]:
    """The K timesteps (descending) student `calls` of a distilled checkpoint samples at."""
    check_calls(calls, distilled_calls(config))
    return [int(t) for t in config[DISTILL_CONFIG_KEY]["calls"][str(int(calls))]]


def student_prediction_of(config: Mapping[str, Any], calls: int) -> List[str]:
    """What student `calls` outputs at each of its K steps ("eps", "x0" or "v"; the teacher's unless the
    checkpoint says otherwise)."""
    check_calls(calls, distilled_calls(config))
    per_step = config[DISTILL_CONFIG_KEY].get("prediction") or {}
    got = per_step.get(str(int(calls)), config["diffusion"].get("prediction", "eps"))
    return [str(got)] * int(calls) if isinstance(got, str) else [str(p) for p in got]


def ddim_sampler(diffusion: Any, timesteps: Sequence[int], predictions: Optional[Sequence[str]] = None):
    """Deterministic DDIM at `timesteps` whose step s reads the model output as `predictions[s]` ("eps", "x0",
    "v"; default: the diffusion's everywhere). One coefficient table, one fused op per step: a row's
    prediction type only changes its coefficients (x0 = A x + B m, eps = Ex x + Em m)."""
    from .samplers import DDIMSampler

    return DDIMSampler(diffusion, steps=[int(t) for t in timesteps], eta=0.0, predictions=predictions)


def build_student_set(config: Mapping[str, Any], build_one: Callable[[Dict[str, Any]], torch.nn.Module]) -> StudentSet:
    """A StudentSet for a distilled config, each student built by `build_one(config)` (the U-Net builder)."""
    return StudentSet({k: build_one(dict(config)) for k in distilled_calls(config)})


def student_for(model: torch.nn.Module, diffusion: Any, config: Mapping[str, Any], steps: Optional[int]):
    """(the K-call student, its DDIM sampler) of a loaded distilled checkpoint for `steps` = K model calls.

    `steps` None takes the most calls the checkpoint holds (its best quality); a K it was not distilled
    for raises ValueError naming the counts it has.
    """
    calls = distilled_calls(config)
    k = max(calls) if steps is None else check_calls(steps, calls)
    sampler = ddim_sampler(diffusion, student_timesteps_of(config, k), student_prediction_of(config, k))
    sampler.spacing = f"distilled ({k} calls)"
    return model.for_calls(k), sampler
