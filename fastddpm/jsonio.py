"""Reading JSON that users or other programs wrote (configs, metadata, tuned schedules), bounded.

:func:`loads` / :func:`load_file` parse like :func:`json.loads` but refuse, with one ValueError naming
the file, what no fastddpm file ever holds and what would otherwise end in a traceback: nesting deeper
than :data:`MAX_DEPTH` (Python's parser recurses: thousands of ``[`` raise RecursionError), integers of
more than :data:`MAX_INT_DIGITS` digits (Python refuses to convert 4300+ digits, and huge ones are never a
real count) and files larger than :data:`MAX_BYTES`. ``NaN`` / ``Infinity`` are read as Python writes them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

__all__ = ["JSONInputError", "loads", "load_file", "MAX_DEPTH", "MAX_INT_DIGITS", "MAX_BYTES"]

MAX_DEPTH = 32
MAX_INT_DIGITS = 40
MAX_BYTES = 64 * 1024 * 1024

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


class JSONInputError(ValueError):
    """A JSON input that cannot be read or is refused; the message names where it came from."""


def _depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON `text` (strings skipped)."""
    depth = deepest = 0
    for ch in re.sub(r"[^\[\]{}]", "", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError(f"an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(s)


def loads(text: str, where: str, what: str = "JSON") -> Any:
    """Parse JSON `text` (read from `where`, named in errors, as `what`) within the bounds of this module."""
    if len(text) > MAX_BYTES:
        raise JSONInputError(f"{where}: {len(text)} characters of JSON exceed the bound {MAX_BYTES}")
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise JSONInputError(f"{where}: JSON nested {depth} levels deep (at most {MAX_DEPTH} are accepted)")
    try:
        return json.loads(text, parse_int=_int)
    except JSONInputError as e:
        raise JSONInputError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise JSONInputError(f"{where}: truncated or invalid {what} ({e})") from None


def load_file(path: str) -> Any:
    """Parse the JSON file `path` (see :func:`loads`); JSONInputError naming it when it cannot be read."""
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise JSONInputError(f"{path}: {size} bytes of JSON exceed the bound {MAX_BYTES}")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise JSONInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise JSONInputError(f"{path}: cannot read ({e.strerror or e})") from None
    return loads(text, path)
