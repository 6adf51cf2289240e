"""Timestep schedules tuned for one model: search, and storage beside the checkpoint."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

SCHEDULES_FORMAT = "fastddpm-schedules"


def schedules_path(checkpoint_path: str) -> str:
    """Where the tuned schedules of a checkpoint live: ``X.schedules.json`` beside a ``X.safetensors``
    file, ``schedules.json`` inside a checkpoint directory."""
    if os.path.isdir(checkpoint_path):
        return os.path.join(checkpoint_path, "schedules.json")
    return os.path.splitext(checkpoint_path)[0] + ".schedules.json"


def load_tuned_schedules(checkpoint_path: str) -> Dict[str, Dict[str, List[int]]]:
    """{sampler name: {str(steps): descending timesteps}} stored with a checkpoint ({} when none)."""
    path = schedules_path(checkpoint_path)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return {k: {s: [int(t) for t in v["timesteps"]] for s, v in d.items()} for k, d in data.get("schedules", {}).items()}
