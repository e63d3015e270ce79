"""The Codex app-server's own JSON Schema (tests/schema/, from 0.169.0) as the
judge of every message the server sends (PROTOCOL §5).

Responses are checked against ``<Name>Response`` for the request's method,
notifications against their entry in ``ServerNotification``. Methods the
schema does not know (``app/list``'s and ``plugin/list``'s older shapes are
known; our own extensions are not) pass unchecked.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

BUNDLE = Path(__file__).parent / "schema" / "codex_app_server_protocol.schemas.json"
BUNDLE_URI = "urn:codex-app-server-0.169.0"

# Methods whose params type does not name their response type.
RESPONSE_NAMES = {"configRequirements/read": "ConfigRequirementsReadResponse"}


@cache
def _bundle() -> dict[str, Any]:
    return json.loads(BUNDLE.read_text())


@cache
def _registry() -> Registry:
    return Registry().with_resource(BUNDLE_URI, Resource.from_contents(_bundle(), default_specification=DRAFT7))


def _definition_ref(name: str) -> str | None:
    definitions = _bundle()["definitions"]
    if name in definitions["v2"]:
        return f"{BUNDLE_URI}#/definitions/v2/{name}"
    if name in definitions:
        return f"{BUNDLE_URI}#/definitions/{name}"
    return None


@cache
def _validator(ref: str) -> Draft7Validator:
    return Draft7Validator({"$ref": ref}, registry=_registry())


@cache
def _method_refs() -> tuple[dict[str, str], dict[str, str]]:
    """(request method → response ref, notification method → params ref)."""
    definitions = _bundle()["definitions"]
    responses: dict[str, str] = {}
    for variant in definitions["ClientRequest"]["oneOf"]:
        method = variant["properties"]["method"]["enum"][0]
        params_ref = variant["properties"].get("params", {}).get("$ref", "")
        name = RESPONSE_NAMES.get(method) or params_ref.rsplit("/", 1)[-1].replace("Params", "Response")
        ref = _definition_ref(name) if name else None
        if ref is not None:
            responses[method] = ref
    notifications: dict[str, str] = {}
    for kind in ("ServerNotification", "ServerRequest"):  # a server request is checked like a notification
        for variant in definitions[kind]["oneOf"]:
            method = variant["properties"]["method"]["enum"][0]
            notifications[method] = variant["properties"]["params"]["$ref"].replace("#", f"{BUNDLE_URI}#", 1)
    return responses, notifications


def known_request_methods() -> set[str]:
    return set(_method_refs()[0])


def schema_errors(message: dict[str, Any], request_method: str | None) -> list[str]:
    """What is wrong with one server message; ``request_method`` is the method
    of the request a response answers (None for a notification)."""
    responses, notifications = _method_refs()
    if "method" in message:
        ref, instance = notifications.get(message["method"]), message.get("params")
        what = f"{'server request' if 'id' in message else 'notification'} {message['method']}"
    elif "result" in message and request_method is not None:
        ref, instance = responses.get(request_method), message["result"]
        what = f"result of {request_method}"
    else:
        return []  # errors have their own shape (PROTOCOL §3), checked by the tests
    if ref is None:
        return []
    return [
        f"{what}: {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in _validator(ref).iter_errors(instance)
    ]
