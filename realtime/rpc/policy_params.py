"""What a client may ask of the sandbox and of approvals (PROTOCOL §11):
``thread/start``'s ``sandbox`` and ``approvalPolicy``, and ``turn/start``'s
``sandboxPolicy`` and ``approvalPolicy``, which stick for later turns."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from realtime.tools.sandbox import FULL_ACCESS, MODES, READ_ONLY, WORKSPACE_WRITE

from .protocol import JsonRpcError

ON_REQUEST = "on-request"
APPROVAL_POLICIES = ("untrusted", ON_REQUEST, "never")
# turn/start's SandboxPolicy types, as the thread's modes.
POLICY_MODES = {"readOnly": READ_ONLY, "workspaceWrite": WORKSPACE_WRITE, "dangerFullAccess": FULL_ACCESS}


def sandbox_mode(params: dict[str, Any]) -> str:
    """``thread/start``'s ``sandbox``; read-only if omitted."""
    mode = params.get("sandbox")
    if mode is None:
        return READ_ONLY
    if mode not in MODES:
        raise JsonRpcError.invalid_params(f"sandbox must be one of {', '.join(MODES)}")
    return _allowed(mode)


def turn_sandbox(params: dict[str, Any]) -> tuple[str, bool] | None:
    """``turn/start``'s ``sandboxPolicy`` as (mode, network access), None if omitted.
    The writable root is the thread's cwd, whatever ``writableRoots`` says."""
    policy = params.get("sandboxPolicy")
    if policy is None:
        return None
    if not isinstance(policy, dict) or policy.get("type") not in POLICY_MODES:
        raise JsonRpcError.invalid_params(f"sandboxPolicy.type must be one of {', '.join(POLICY_MODES)}")
    network = policy.get("networkAccess", False)
    if not isinstance(network, bool):
        raise JsonRpcError.invalid_params("sandboxPolicy.networkAccess must be a boolean")
    mode = _allowed(POLICY_MODES[policy["type"]])
    return mode, network and mode == WORKSPACE_WRITE


def _allowed(mode: str) -> str:
    if mode == FULL_ACCESS and not settings.CODEX_ALLOW_FULL_ACCESS:
        raise JsonRpcError.invalid_params(
            "sandbox danger-full-access is refused on this server (its operator has not set CODEX_ALLOW_FULL_ACCESS=1)"
        )
    return mode


def approval_policy(params: dict[str, Any], default: Any = ON_REQUEST) -> Any:
    """``approvalPolicy`` (either method's); ``default`` if omitted."""
    policy = params.get("approvalPolicy")
    if policy is None:
        return default
    if policy in APPROVAL_POLICIES or (
        isinstance(policy, dict) and set(policy) == {"granular"} and isinstance(policy["granular"], dict)
        and all(isinstance(value, bool) for value in policy["granular"].values())
    ):  # fmt: skip
        return policy
    raise JsonRpcError.invalid_params("approvalPolicy must be untrusted, on-request, never, or {granular: {…}}")
