"""Class labels for a conditional model: fixed labels (:class:`Conditioned`), and classifier-free guidance
(Ho & Salimans 2022, :class:`GuidedModel`), each as a model(x, t) wrapper.

eps_guided = eps(x, t, null) + w * (eps(x, t, y) - eps(x, t, null)); w = 1 is the conditional model,
w = 0 the unconditional one. The conditional and unconditional outputs come from ONE batched model
call on [x; x] with labels [y; null]. With learned variance (2C output channels) only the first C
channels are guided; the variance channels are the conditional ones (as in GLIDE).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch


class Conditioned(torch.nn.Module):
    """model(x, t) -> model(x, t, y) with fixed labels (None: unconditional / null class)."""

    def __init__(self, model: torch.nn.Module, y: Optional[torch.Tensor]):
        super().__init__()
        self.model = model
        self.y = y

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.y is None:
            return self.model(x, t)
        return self.model(x, t, self.y[: x.shape[0]])


class GuidedModel:
    """model(x, t) for a class-conditional `model(x, t, y=...)` with guidance.

    Args:
        model: the conditional model; `model(x, t, y=labels)`; `null_label` is its unconditional class.
        labels: int64 [N] class labels, one per image (moved to the model's device once).
        guidance_scale: w, a float or a 0-d tensor (kept as a tensor so one CUDA graph serves any w).
        null_label: the label of the null class (fd.UNet uses num_classes).
        channels: C, the number of image channels (to tell eps channels from variance channels).
    """

    def __init__(self, model: Callable[..., Any], labels: torch.Tensor, guidance_scale: Union[float, torch.Tensor],
                 null_label: int, channels: int):
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be an int64 tensor [N], got {labels.dtype} {tuple(labels.shape)}")
        self.model = model
        self.labels = labels.to(torch.int64)
        self.null = torch.full_like(self.labels, int(null_label))
        self.both = torch.cat([self.labels, self.null])
        self.scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=labels.device).reshape(())
        self.channels = int(channels)

    def to(self, device: torch.device) -> "GuidedModel":
        self.labels, self.null, self.both = self.labels.to(device), self.null.to(device), self.both.to(device)
        self.scale = self.scale.to(device)
        return self

    def parameters(self):
        params = getattr(self.model, "parameters", None)
        return params() if params is not None else iter(())

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n != self.labels.shape[0]:
            raise ValueError(f"labels has {self.labels.shape[0]} entries but the batch has {n} images")
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=self.both)
        out = out if isinstance(out, torch.Tensor) else out.sample
        cond, uncond = out[:n], out[n:]
        c = self.channels
        guided = uncond[:, :c] + self.scale.to(out.dtype) * (cond[:, :c] - uncond[:, :c])
        return guided if out.shape[1] == c else torch.cat([guided, cond[:, c:]], dim=1)
