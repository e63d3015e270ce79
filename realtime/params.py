"""Reading request params: each miss becomes -32602 naming the field."""

from __future__ import annotations

from typing import Any

from .protocol import JsonRpcError


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
