"""Writing files so that a crash never leaves a half-written file under the real name,
and reading the JSON files of a run with errors that name the file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)``, then renames tmp_path to ``path`` (same directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, atomically, fsync'd."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; FileNotFoundError / ValueError naming the file when it
    is missing, not JSON (a file cut short, edited by hand) or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column "
                         f"{err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data
