"""Reading request params: each miss becomes -32602 naming the field."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from realtime.store.storable_text import storable

from .protocol import JsonRpcError

T = TypeVar("T")


def params_object(params: Any) -> dict[str, Any]:
    """Params must be an object; absent params read as ``{}``."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise JsonRpcError.invalid_params("params must be an object")
    return params


def required_str(params: dict[str, Any], name: str) -> str:
    if name not in params:
        raise JsonRpcError.invalid_params(f"missing field {name}")
    return _str(params, name)


def optional_str(params: dict[str, Any], name: str) -> str | None:
    if params.get(name) is None:
        return None
    return _str(params, name)


def _str(params: dict[str, Any], name: str) -> str:
    value = params[name]
    if not isinstance(value, str):
        raise JsonRpcError.invalid_params(f"{name} must be a string")
    return value


def optional_stored_str(params: dict[str, Any], name: str, max_chars: int | None = None) -> str | None:
    """``optional_str`` for a value the database keeps (``storable``), at
    most ``max_chars`` long: it is stored, and sent back in every listing."""
    value = optional_str(params, name)
    if value is not None and max_chars is not None and len(value) > max_chars:
        raise JsonRpcError.invalid_params(f"{name} must be at most {max_chars} characters")
    return None if value is None else require_storable(value, name)


MAX_MODEL_CHARS = 256  # the stored column's length (realtime.models)
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def optional_model(params: dict[str, Any]) -> str | None:
    """``model``: a name, not text. An upstream echoes it in its errors, which
    are logged and sent to every subscriber: no control characters in it."""
    model = optional_str(params, "model")
    if model is None:
        return None
    require_storable(model, "model")
    if len(model) > MAX_MODEL_CHARS or CONTROL_CHARACTERS.search(model):
        raise JsonRpcError.invalid_params(f"model must be a name of at most {MAX_MODEL_CHARS} characters, without control characters")
    return model


def require_storable(value: T, name: str) -> T:
    """``value`` (a string, or a JSON value of them), or -32602 naming the
    field if it cannot be stored (``storable``)."""
    if not storable(value):
        raise JsonRpcError.invalid_params(f"{name} must be valid Unicode text without NUL characters")
    return value


def optional_object(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JsonRpcError.invalid_params(f"{name} must be an object")
    return value


def required_list(params: dict[str, Any], name: str) -> list[Any]:
    if name not in params:
        raise JsonRpcError.invalid_params(f"missing field {name}")
    value = params[name]
    if not isinstance(value, list):
        raise JsonRpcError.invalid_params(f"{name} must be an array")
    return value


def optional_bool(params: dict[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise JsonRpcError.invalid_params(f"{name} must be a boolean")
    return value


def optional_int(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise JsonRpcError.invalid_params(f"{name} must be a non-negative integer")
    return value


def optional_str_list(params: dict[str, Any], name: str) -> list[str] | None:
    value = params.get(name)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise JsonRpcError.invalid_params(f"{name} must be an array of strings")
    return value
