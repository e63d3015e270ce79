"""What a Codex client reads at start-up about the server (PROTOCOL §8).

The server holds the upstream credentials and runs no tools, so most of these
are fixed answers: no account to sign in to, no hooks, skills, installed
plugins or requirements. Each is still a full, schema-valid result: the Codex
TUI refuses to start when any of them fails.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from ..params import optional_str_list, params_object
from .threads import MODEL_PROVIDER

REASONING_EFFORTS = ("low", "medium", "high")
COLLABORATION_MODES = ({"name": "Default", "mode": "default", "model": None, "reasoning_effort": None},)


def offered_models() -> list[str]:
    """``CODEX_MODEL`` first (the default), then ``CODEX_MODELS`` in order, no repeats."""
    return list(dict.fromkeys([settings.CODEX_MODEL, *settings.CODEX_MODELS]))


def _model_json(model: str, is_default: bool) -> dict[str, Any]:
    return {
        "id": model,
        "model": model,
        "displayName": model,
        "description": "Served by this app-server" + (" (default)" if is_default else ""),
        "hidden": False,
        "isDefault": is_default,
        "defaultReasoningEffort": "medium",
        "supportedReasoningEfforts": [
            {"reasoningEffort": effort, "description": f"{effort.title()} reasoning effort"} for effort in REASONING_EFFORTS
        ],
        "inputModalities": ["text", "image"],
        "upgrade": None,
    }


async def read_account(context, params: Any) -> dict[str, Any]:
    # The server calls upstream with its own key: the client signs in to nothing.
    return {"account": None, "requiresOpenaiAuth": False}


async def list_models(context, params: Any) -> dict[str, Any]:
    models = offered_models()
    return {"data": [_model_json(model, index == 0) for index, model in enumerate(models)], "nextCursor": None}


async def read_config(context, params: Any) -> dict[str, Any]:
    # Effective settings a client may show; never a URL with credentials or a key.
    return {
        "config": {"model": settings.CODEX_MODEL, "model_provider": MODEL_PROVIDER, "approval_policy": "on-request", "sandbox_mode": "read-only"},
        "origins": {},
        "layers": None,
    }


async def read_config_requirements(context, params: Any) -> dict[str, Any]:
    return {"requirements": None}


def _per_cwd(params: Any, **empty_lists: list) -> dict[str, Any]:
    cwds = optional_str_list(params_object(params), "cwds") or []
    return {"data": [{"cwd": cwd, **{name: list(value) for name, value in empty_lists.items()}} for cwd in cwds]}


async def list_hooks(context, params: Any) -> dict[str, Any]:
    return _per_cwd(params, hooks=[], errors=[], warnings=[])


async def list_skills(context, params: Any) -> dict[str, Any]:
    # No skills are served yet, so there is nothing to filter by originator.
    return _per_cwd(params, skills=[], errors=[])


async def list_installed_plugins(context, params: Any) -> dict[str, Any]:
    params_object(params)
    return {"marketplaces": [], "marketplaceLoadErrors": []}


async def list_collaboration_modes(context, params: Any) -> dict[str, Any]:
    return {"data": [dict(mode) for mode in COLLABORATION_MODES]}


async def check_gov_cloud_requirements(context, params: Any) -> dict[str, Any]:
    return {"isGovCloud": False, "shouldWarn": False}
