"""Who is first-party, who is infrastructure, and the process default originator.

The one place these rules live: identity construction, plugin discovery and
the admin flags all ask this module, never a copy of its lists.
"""

import logging
import os
from functools import lru_cache

from .header_values import is_valid_header_value

logger = logging.getLogger(__name__)

DEFAULT_ORIGINATOR = "codex_cli_rs"
ORIGINATOR_OVERRIDE_ENV = "CODEX_INTERNAL_ORIGINATOR_OVERRIDE"
FIRST_PARTY_ENV = "CODEX_FIRST_PARTY_ORIGINATORS"

# Tools that embed the server: their work is attributed to the product, so
# their originator is the process default (PROTOCOL §4).
INFRASTRUCTURE_CLIENTS = frozenset({"codex_app_server_daemon", "codex-backend"})

FIRST_PARTY_ORIGINATORS = frozenset(
    {
        "codex_cli_rs",
        "codex-tui",
        "codex_vscode",
        "codex_exec",
        "codex_atlas",
        "codex_chatgpt_desktop",
        "codex_ios",
        "codex_android",
    }
)
FIRST_PARTY_PREFIX = "Codex "


def is_infrastructure_client(client_name: str) -> bool:
    return client_name in INFRASTRUCTURE_CLIENTS


@lru_cache(maxsize=1)
def _extra_first_party() -> frozenset[str]:
    raw = os.environ.get(FIRST_PARTY_ENV, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def first_party_originators() -> frozenset[str]:
    """The named first-party originators (besides any starting with ``Codex ``)."""
    return FIRST_PARTY_ORIGINATORS | _extra_first_party()


def is_first_party_originator(originator: str) -> bool:
    return (
        originator in FIRST_PARTY_ORIGINATORS
        or originator.startswith(FIRST_PARTY_PREFIX)
        or originator in _extra_first_party()
    )


@lru_cache(maxsize=1)
def process_default_originator() -> str:
    """Read once per process: nothing a client sends can change it afterwards."""
    override = os.environ.get(ORIGINATOR_OVERRIDE_ENV)
    if override is None:
        return DEFAULT_ORIGINATOR
    if is_valid_header_value(override):
        return override
    logger.warning(
        "Ignoring %s: not a valid HTTP header value; using %s",
        ORIGINATOR_OVERRIDE_ENV,
        DEFAULT_ORIGINATOR,
    )
    return DEFAULT_ORIGINATOR
