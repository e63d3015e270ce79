"""The frozen identity value a connection gets at ``initialize``."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache

from codexserver import __version__ as SERVER_VERSION

from . import policy
from .header_values import is_valid_header_value


class InvalidClientInfo(ValueError):
    """A clientInfo field that cannot go on the wire; the message is PROTOCOL §3's."""

    def __init__(self, field: str, value: object):
        self.field = field
        self.value = value
        super().__init__(
            f"Invalid clientInfo.{field}: '{value}'. Must be a valid HTTP header value."
        )


@lru_cache(maxsize=1)
def platform_description() -> str:
    """``Linux 6.1.0; x86_64``: the middle part of every User-Agent."""
    return f"{platform.system()} {platform.release()}; {platform.machine()}"


def build_user_agent(originator: str, client_name: str, client_version: str) -> str:
    return (
        f"{originator}/{SERVER_VERSION} ({platform_description()}) "
        f"({client_name}; {client_version})"
    )


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who a connection is, fixed once; everything outbound is labelled from it."""

    client_name: str
    client_version: str
    client_title: str | None
    originator: str
    user_agent: str
    is_infrastructure: bool
    is_first_party: bool

    @classmethod
    def from_client_info(
        cls, name: object, version: object, title: str | None = None
    ) -> ClientIdentity:
        """Validate ``clientInfo`` and derive the identity; raises InvalidClientInfo."""
        if not is_valid_header_value(name):
            raise InvalidClientInfo("name", name)
        if not is_valid_header_value(version):
            raise InvalidClientInfo("version", version)
        infrastructure = policy.is_infrastructure_client(name)
        originator = policy.process_default_originator() if infrastructure else name
        return cls._derive(name, version, title, originator, infrastructure)

    @classmethod
    def _derive(
        cls, name: str, version: str, title: str | None, originator: str, infrastructure: bool
    ) -> ClientIdentity:
        return cls(
            client_name=name,
            client_version=version,
            client_title=title,
            originator=originator,
            user_agent=build_user_agent(originator, name, version),
            is_infrastructure=infrastructure,
            is_first_party=policy.is_first_party_originator(originator),
        )


@lru_cache(maxsize=1)
def process_default_identity() -> ClientIdentity:
    """The identity of work that belongs to no connection (startup, commands)."""
    originator = policy.process_default_originator()
    return ClientIdentity._derive(originator, SERVER_VERSION, None, originator, infrastructure=False)
