"""What counts as a valid HTTP header value for client-supplied identity fields.

PROTOCOL §4: 1 to 256 characters, each visible ASCII (0x21-0x7E) or an inner
space. Anything else could split or smuggle headers once it reaches the wire.
"""

import re

MAX_HEADER_VALUE_LENGTH = 256

# Visible ASCII, with single spaces allowed only between visible characters.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x21-\x7e ]*[\x21-\x7e])?")


def is_valid_header_value(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_HEADER_VALUE_LENGTH
        and _HEADER_VALUE.fullmatch(value) is not None
    )
