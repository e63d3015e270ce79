"""JSON-RPC messages (without the "jsonrpc" member) and the error table of PROTOCOL §3."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RequestId = str | int

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server-defined range: an upstream refused or failed a request made for it,
# or the principal's budget is used up; ``data.codexErrorInfo`` says which.
UPSTREAM_ERROR = -32000
SERVER_OVERLOADED = -32001

MAX_FRAME_BYTES = 1024 * 1024
# Nesting a message may have: far past any the schema describes (a dynamic
# tool's input schema is the deepest), far short of what makes a recursive
# walk of it (storing, logging, schema checks) run out of stack.
MAX_JSON_DEPTH = 64


class JsonRpcError(Exception):
    """An error reply; ``request_id`` is None when the request could not be read."""

    def __init__(self, code: int, message: str, data: Any = None, request_id: RequestId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.request_id = request_id
        self.method: Any = None  # of the request refused, where it could be read

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def parse_error(cls, detail: str) -> JsonRpcError:
        return cls(PARSE_ERROR, f"Parse error: {detail}")

    @classmethod
    def invalid_request(cls, detail: str, request_id: RequestId | None = None) -> JsonRpcError:
        return cls(INVALID_REQUEST, f"Invalid request: {detail}", request_id=request_id)

    @classmethod
    def not_initialized(cls) -> JsonRpcError:
        return cls(INVALID_REQUEST, "Not initialized")

    @classmethod
    def already_initialized(cls) -> JsonRpcError:
        return cls(INVALID_REQUEST, "Already initialized")

    @classmethod
    def method_not_found(cls, method: str) -> JsonRpcError:
        return cls(METHOD_NOT_FOUND, f"Method not found: {method}")

    @classmethod
    def invalid_params(cls, detail: str) -> JsonRpcError:
        return cls(INVALID_PARAMS, f"Invalid params: {detail}")

    @classmethod
    def internal_error(cls) -> JsonRpcError:
        return cls(INTERNAL_ERROR, "Internal error")

    @classmethod
    def upstream_failure(cls, message: str, codex_error_info: Any) -> JsonRpcError:
        return cls(UPSTREAM_ERROR, f"Upstream error: {message}", data={"codexErrorInfo": codex_error_info})

    @classmethod
    def usage_limit_exceeded(cls, message: str) -> JsonRpcError:
        """The principal's token budget is used up (PROTOCOL §12); the same
        ``codexErrorInfo`` as the upstream's usage limit."""
        return cls(UPSTREAM_ERROR, message, data={"codexErrorInfo": "usageLimitExceeded"})

    @classmethod
    def overloaded(cls) -> JsonRpcError:
        return cls(SERVER_OVERLOADED, "Server overloaded; retry later.")


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: Any = None


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Any = None


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A reply from the client to a server request (an approval)."""

    id: RequestId
    payload: dict = field(default_factory=dict)

    @property
    def result(self) -> Any:
        return self.payload.get("result")

    @property
    def error(self) -> Any:
        return self.payload.get("error")


Message = Request | Notification | ClientResponse


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def is_request_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_message(frame: str) -> Message:
    """Decode one text frame; raises JsonRpcError with the error to send back."""
    try:
        obj = json.loads(frame, parse_constant=_reject_constant)
    except RecursionError:
        raise JsonRpcError.parse_error("nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise JsonRpcError.parse_error(str(exc)) from None
    if not isinstance(obj, dict):
        raise JsonRpcError.parse_error("a message must be a JSON object")

    has_id = "id" in obj
    request_id = obj.get("id")
    if has_id and not is_request_id(request_id):
        raise JsonRpcError.invalid_request("id must be a string or an integer")
    method = obj.get("method")
    # Each level needs a bracket: a frame with few (nearly all of them) needs no walk.
    if _brackets(frame) > MAX_JSON_DEPTH and nesting_exceeds(obj, MAX_JSON_DEPTH):  # requests and answers alike
        message = f"nested deeper than {MAX_JSON_DEPTH} levels"
        if method is None and has_id and ("result" in obj or "error" in obj):
            # An answer to a server request: taken as an error answer, so what waits for it goes on.
            return ClientResponse(request_id, {"id": request_id, "error": {"code": INVALID_PARAMS, "message": message}})
        error = JsonRpcError.invalid_params(message)
        error.request_id, error.method = (request_id if has_id else None), method
        raise error
    if method is None:
        if has_id and ("result" in obj or "error" in obj):
            return ClientResponse(request_id, obj)
        raise JsonRpcError.invalid_request("missing method", request_id)
    if not isinstance(method, str):
        raise JsonRpcError.invalid_request("method must be a string", request_id)
    if not has_id:
        return Notification(method, obj.get("params"))
    return Request(request_id, method, obj.get("params"))


def _brackets(frame: str) -> int:
    return frame.count("{") + frame.count("[")


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest deeper than ``limit``;
    walked without recursion, whatever the depth."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# json.dumps builds an encoder per call when given separators; one will do,
# and every frame is encoded by its method directly (no wrapper call).
# Its ASCII escapes keep lone surrogates a client sent us encodable as UTF-8.
encode: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":")).encode


def response(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"id": request_id, "result": result}


def error_response(request_id: RequestId | None, error: JsonRpcError) -> dict[str, Any]:
    return {"id": request_id, "error": error.to_error()}
