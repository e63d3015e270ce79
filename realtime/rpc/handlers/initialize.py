"""``initialize``: validate clientInfo, store the identity in one write, adopt it."""

from __future__ import annotations

import json
import logging
import platform
from typing import Any

from django.conf import settings

from identity.actions import record_connection_initialized
from identity.client_identity import ClientIdentity, InvalidClientInfo
from identity.scope import identity_scope
from realtime.store.storable_text import storable

from ..params import optional_object, params_object
from ..protocol import INVALID_REQUEST, JsonRpcError

logger = logging.getLogger(__name__)

MAX_TITLE_CHARS = 512
MAX_CAPABILITIES_BYTES = 16 * 1024


def platform_family_and_os() -> tuple[str, str]:
    system = platform.system()
    if system == "Windows":
        return "windows", "windows"
    return "unix", {"Darwin": "macos"}.get(system, system.lower())


async def initialize(context, params: Any) -> dict[str, Any]:
    connection = context.connection
    if connection.identity is not None:
        raise JsonRpcError.already_initialized()
    params = params_object(params)
    if not isinstance(params.get("clientInfo"), dict):
        raise JsonRpcError.invalid_params("clientInfo must be an object")
    client_info = params["clientInfo"]
    for field in ("name", "version"):
        if not isinstance(client_info.get(field), str):
            raise JsonRpcError.invalid_params(f"clientInfo.{field} must be a string")
    title = client_info.get("title")
    if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE_CHARS):
        raise JsonRpcError.invalid_params(f"clientInfo.title must be a string of at most {MAX_TITLE_CHARS} characters")
    if title is not None and not storable(title):
        raise JsonRpcError.invalid_params("clientInfo.title must be valid Unicode text without NUL characters")
    capabilities = optional_object(params, "capabilities")
    if len(json.dumps(capabilities)) > MAX_CAPABILITIES_BYTES:
        raise JsonRpcError.invalid_params(f"capabilities must be at most {MAX_CAPABILITIES_BYTES} bytes")
    if not storable(capabilities):
        raise JsonRpcError.invalid_params("capabilities must hold valid Unicode text without NUL characters")
    opt_out = capabilities.get("optOutNotificationMethods") or []
    if not isinstance(opt_out, list) or not all(isinstance(m, str) for m in opt_out):
        raise JsonRpcError.invalid_params("capabilities.optOutNotificationMethods must be an array of strings")

    try:
        identity = ClientIdentity.from_client_info(client_info["name"], client_info["version"], title)
    except InvalidClientInfo as exc:
        raise JsonRpcError(INVALID_REQUEST, str(exc)) from None

    await record_connection_initialized(connection.connection_id, identity, capabilities)
    connection.adopt_identity(identity, frozenset(opt_out))
    with identity_scope(identity, str(connection.connection_id)):
        logger.info("initialized: %s", identity.user_agent)
    family, os_name = platform_family_and_os()
    return {
        "userAgent": identity.user_agent,
        "platformFamily": family,
        "platformOs": os_name,
        "codexHome": settings.CODEX_HOME,
    }
