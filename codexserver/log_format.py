"""Log records that say whose work they describe, and never carry a secret.

``IdentityLogFilter`` stamps every record with the ``connection_id`` and
``originator`` of the identity scope it was emitted in (``-`` outside one), so
a line from a turn's background task names the connection it belongs to.
``RedactingFormatter`` removes the API key, the WebSocket auth token and any
issued token from the final text, tracebacks included, and keeps one record
one line: control characters in a message (a client's ``model`` with a
newline and an escape, echoed in an upstream's error) are escaped, and each
line of a traceback is marked as the record's continuation, so no value can
forge a line of its own.
"""

from __future__ import annotations

import logging
import re

from django.conf import settings

from identity.scope import current_scope

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [conn=%(connection_id)s originator=%(originator)s] %(message)s"
REDACTED = "[redacted]"


# An issued token (identity.principals): never logged, wherever it turns up.
ISSUED_TOKEN = re.compile(r"cxs_[A-Za-z0-9_-]{43}")


def redact_secrets(text: str) -> str:
    for secret in (settings.OPENAI_API_KEY, settings.CODEX_WS_AUTH_TOKEN):
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    if "cxs_" in text:
        text = ISSUED_TOKEN.sub(REDACTED, text)
    return text


class IdentityLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        scope = current_scope()
        record.connection_id = (scope.connection_id or "-") if scope else "-"
        record.originator = scope.identity.originator if scope else "-"
        return True


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CONTINUATION = "\n  | "  # how a traceback's lines follow their record


def escape_controls(text: str) -> str:
    return CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def _continued(text: str) -> str:
    """A traceback or stack's lines, each marked as part of the record above."""
    return CONTINUATION.join(escape_controls(line) for line in text.split("\n")).removeprefix(CONTINUATION)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "  | " + _continued(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return "  | " + _continued(super().formatStack(stack_info))
