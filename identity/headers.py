"""The one place outbound identity headers are built."""

from __future__ import annotations

from .client_identity import ClientIdentity


def build_outbound_headers(
    identity: ClientIdentity, *, bearer_token: str | None = None
) -> dict[str, str]:
    """Headers every request or handshake made for ``identity`` carries."""
    headers = {"originator": identity.originator, "User-Agent": identity.user_agent}
    if bearer_token:
        headers["Authorization"] = f"Bearer {bearer_token}"
    return headers
