"""Model parameters as bytes: named numpy arrays plus a JSON header, never pickle.

Snapshots and deltas travel through Redis and land on disk; whoever loads them runs no code
from them (``np.load(allow_pickle=False)``), so a tampered blob can at worst fail to parse.

>>> import numpy as np
>>> blob = encode({"model": "ftrl", "version": 3}, {"w": np.array([0.5, -1.0])})
>>> header, arrays = decode(blob)
>>> header["version"], arrays["w"].tolist()
(3, [0.5, -1.0])
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

_HEADER = "__header__"


class ParamsError(ValueError):
    """A blob that is not a parameter file of ours."""


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    if _HEADER in arrays:
        raise ValueError(f"{_HEADER} is reserved")
    buf = io.BytesIO()
    meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, **{_HEADER: meta}, **arrays)
    return buf.getvalue()


def decode(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError, EOFError) as exc:
        raise ParamsError(f"not a freshrec parameter blob: {exc}") from None
    if _HEADER not in arrays:
        raise ParamsError("not a freshrec parameter blob: no header")
    header = json.loads(arrays.pop(_HEADER).tobytes())
    return header, arrays


def decode_for(blob: bytes, model: str, kind: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`decode`, refusing parameters of another model, or of another kind when one is asked for."""
    header, arrays = decode(blob)
    if header.get("model") != model:
        raise ParamsError(f"parameters of model {header.get('model')!r}, not {model!r}")
    if kind is not None and header.get("kind") != kind:
        raise ParamsError(f"expected a {kind}, got a {header.get('kind')}")
    return header, arrays


def strings(values: list[str]) -> np.ndarray:
    """Ids as a fixed-width unicode array (object arrays would need pickle)."""
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")
