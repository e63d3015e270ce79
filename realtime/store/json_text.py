"""JSON kept as text: a thread's history goes from the database to the model
request without being decoded and encoded again (``threads.History``)."""

from __future__ import annotations


def array_items(array_json: str) -> str:
    """What is between a JSON array's brackets: '' for an empty array, and
    for anything that is not an array (nothing of it is replayed)."""
    text = array_json.strip()
    return text[1:-1].strip() if text.startswith("[") and text.endswith("]") else ""


def joined_arrays(inner_parts: list[str]) -> str:
    """One JSON array of the items of several (``array_items`` of each), in order."""
    return "[" + ", ".join(part for part in inner_parts if part) + "]"
