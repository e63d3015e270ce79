"""``view_image`` (PROTOCOL §11): the model looks at an image file of the
workspace. The file is read inside the turn's sandbox, as a command would
read it, so what the sandbox hides (the server's database, its home, its
secrets) stays hidden; the image goes to the model as the call's output,
and the thread sees an ``imageView`` item."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from .commands import CallRefused, CommandContext, run_in_sandbox
from .sandbox import FULL_ACCESS, READ_ONLY, SandboxPolicy

IMAGE_VIEW = "imageView"
# Sent to the model as a data URL in the call's output, stored with the turn
# and replayed: kept well inside a command's kept output (1 MiB of base64).
MAX_IMAGE_BYTES = 720 * 1024
READ_SECONDS = 10.0
# The file, at most one byte past the limit (so too large is seen), as base64.
READER = 'set -o pipefail; head -c "$1" -- "$2" | base64 -w0'
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def _media_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for signature, media in SIGNATURES if data.startswith(signature)), None)


async def view_image(context: CommandContext, call_id: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    path = arguments.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise CallRefused("view_image needs path, the image file's path")
    path = os.path.normpath(os.path.join(context.cwd, path))
    # Read-only even where the thread has full access: a hidden file stays hidden from it too.
    policy = context.policy if context.policy.mode != FULL_ACCESS else SandboxPolicy(READ_ONLY)
    exit_code, output = await run_in_sandbox(
        context, policy, ["/bin/bash", "-c", READER, "view_image", str(MAX_IMAGE_BYTES + 1), path],
        "view_image", None, READ_SECONDS,
    )  # fmt: skip
    if exit_code != 0:
        reason = output.strip().splitlines()[-1:] or ["it could not be read"]
        raise CallRefused(f"view_image: {path}: {reason[0][-300:]}")
    try:
        data = base64.b64decode(output.strip(), validate=True)
    except binascii.Error:
        raise CallRefused(f"view_image: {path} could not be read") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise CallRefused(f"view_image: {path} is larger than {MAX_IMAGE_BYTES // 1024} KiB")
    media_type = _media_type(data)
    if media_type is None:
        raise CallRefused(f"view_image: {path} is not a PNG, JPEG, GIF or WebP image")
    record = context.start_item({"id": call_id, "type": IMAGE_VIEW, "path": path})
    context.complete_item(record, record.item)
    url = f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
    return [{"type": "input_image", "image_url": url}]
