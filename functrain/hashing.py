"""Plain data (recipes, fingerprints, manifests): its one canonical hash, and differences.

Canonical JSON is `json.dumps` with sorted keys, no whitespace and unescaped non-ASCII,
encoded as UTF-8, so equal plain data (dicts, lists, str, numbers, bool, None) always
gives the same bytes and the same digest, in any process. Recipe hashes recorded in
snapshot manifests are these digests; changing the encoding changes every recorded hash.

>>> canonical_json({"b": 1, "a": [1.5, None, "é"]}).decode()
'{"a":[1.5,null,"é"],"b":1}'
>>> canonical_hash({"a": 1}) == canonical_hash({"a": 1}) != canonical_hash({"a": 2})
True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["ABSENT", "canonical_hash", "canonical_json", "diff", "tensor_bytes"]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


#: What `diff` gives for the side of a key that one mapping does not have.
ABSENT: Any = _Absent()


def canonical_json(value: Any) -> bytes:
    """`value` as compact JSON with sorted keys, non-ASCII kept as is, UTF-8 encoded."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_hash(value: Any) -> str:
    """The sha256 hex digest of `canonical_json(value)`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, row-major, as a content hash takes them (with its dtype and
    shape, which these bytes do not say)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def diff(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs; an absent side is `ABSENT`.

    >>> diff({"a": {"b": 1}, "c": [1, 2]}, {"a": {"b": 1.0}, "c": [1]})
    [('a.b', 1, 1.0), ('c.1', 2, <absent>)]
    """
    out: list[tuple[str, Any, Any]] = []
    _diff(old, new, "", out)
    return out


def _diff(old: Any, new: Any, path: str, out: list) -> None:
    def join(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in list(old) + [k for k in new if k not in old]:
            _diff(old.get(k, ABSENT), new.get(k, ABSENT), join(k), out)
    elif isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else ABSENT
            b = new[i] if i < len(new) else ABSENT
            _diff(a, b, join(i), out)
    elif not _same(old, new):
        out.append((path, old, new))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):  # 1 vs 1.0 vs True: a change in what the recipe says
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
