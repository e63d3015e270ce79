"""Text the databases can keep: PostgreSQL refuses NUL in text and JSON, and
neither database takes a lone surrogate (JSON lets a client or an upstream
send both, as escapes)."""

from __future__ import annotations

import re
from typing import Any

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # a surrogate in a str is a lone one: pairs decode to one character
REPLACEMENT = "\ufffd"


def storable(value: Any) -> bool:
    """Whether every string in ``value`` (a JSON value) can be stored; walked
    without recursion, however deep it nests."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable_str(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def storable_str(text: str) -> bool:
    return ("\x00" not in text if text.isascii() else UNSTORABLE.search(text) is None)


def made_storable(text: str) -> str:
    """``text`` with each NUL and lone surrogate replaced by U+FFFD. For what
    the model sends: the client sees what is stored and replayed, and a
    reply is never lost (nor its thread left locked) because a database
    refused its end."""
    return text if storable_str(text) else UNSTORABLE.sub(REPLACEMENT, text)
