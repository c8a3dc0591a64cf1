"""The one canonical hash of functrain: sha256 of canonical JSON.

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
from typing import Any

__all__ = ["canonical_hash", "canonical_json"]


def canonical_json(value: Any) -> bytes:
    """`value` as compact JSON with sorted keys, non-ASCII kept as is, UTF-8 encoded."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_hash(value: Any) -> str:
    """The sha256 hex digest of `canonical_json(value)`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
