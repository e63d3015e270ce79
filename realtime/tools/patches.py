"""Codex's patch format, parsed and applied (PROTOCOL §11), and nothing else.

    *** Begin Patch
    *** Add File: hello.txt
    +Hello
    *** Update File: src/app.py
    *** Move to: src/main.py          (optional)
    @@ def main():                    (optional: the line to look after)
     context
    -old line
    +new line
    *** Delete File: old.txt
    *** End Patch

Standard library only: ``apply`` runs inside the command sandbox
(``python -m realtime.tools.patches``, the patch on stdin, JSON out), so the
kernel, not a path check, keeps every read and write within what the
thread's sandbox allows. The server only parses, to ask and to show.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field

BEGIN, END = "*** Begin Patch", "*** End Patch"
ADD, DELETE, UPDATE, MOVE = "*** Add File: ", "*** Delete File: ", "*** Update File: ", "*** Move to: "
END_OF_FILE = "*** End of File"
# `apply_patch <<'EOF'` … `EOF`, as models send it through exec_command,
# perhaps after `cd DIR &&` (plain or quoted; nothing a shell would expand).
INVOCATION = re.compile(
    r"^\s*(?:cd\s+(?:'(?P<single>[^']*)'|\"(?P<double>[^\"$`\\]*)\"|(?P<plain>[^\s'\"&;|$`\\]+))\s*&&\s*)?"
    r"(?:apply_patch|applypatch)\s*<<\s*['\"]?(?P<end>\w+)['\"]?\s*\n(?P<patch>.*?)\n(?P=end)\s*$",
    re.DOTALL,
)


class PatchError(ValueError):
    """The patch is malformed or does not apply; the message says where."""


@dataclass
class Chunk:
    anchor: str | None  # the @@ line's text: look for the change after it
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    at_end: bool = False


@dataclass
class FileOperation:
    kind: str  # "add", "delete" or "update"
    path: str
    move_path: str | None = None
    added: list[str] = field(default_factory=list)  # an added file's lines
    chunks: list[Chunk] = field(default_factory=list)

    def change_kind(self) -> dict:
        """The schema's ``PatchChangeKind``."""
        return {"type": "update", "move_path": self.move_path} if self.kind == "update" else {"type": self.kind}


def extract_patch(cmd: str) -> tuple[str | None, str] | None:
    """(the directory it first changes to, or None; the patch text) of an
    ``apply_patch`` heredoc command, or None for any other command."""
    match = INVOCATION.match(cmd)
    if match is None:
        return None
    directory = next((match[kind] for kind in ("single", "double", "plain") if match[kind] is not None), None)
    return directory, match["patch"]


def parse(text: str) -> list[FileOperation]:
    lines = text.strip("\n").split("\n")
    if not lines or lines[0].strip() != BEGIN or lines[-1].strip() != END:
        raise PatchError(f"a patch starts with '{BEGIN}' and ends with '{END}'")
    operations: list[FileOperation] = []
    for line in lines[1:-1]:
        if line.startswith(ADD):
            operations.append(FileOperation("add", _path(line[len(ADD) :])))
        elif line.startswith(DELETE):
            operations.append(FileOperation("delete", _path(line[len(DELETE) :])))
        elif line.startswith(UPDATE):
            operations.append(FileOperation("update", _path(line[len(UPDATE) :])))
        elif not operations:
            raise PatchError(f"expected a file operation, found {line!r}")
        else:
            _body_line(operations[-1], line)
    if not operations:
        raise PatchError("the patch changes no file")
    return operations


def _path(text: str) -> str:
    path = text.strip()
    if not path:
        raise PatchError("a file operation without a path")
    return path


def _body_line(operation: FileOperation, line: str) -> None:
    if operation.kind == "add":
        if not line.startswith("+"):
            raise PatchError(f"{operation.path}: an added file's lines start with '+', found {line!r}")
        operation.added.append(line[1:])
    elif operation.kind == "delete":
        raise PatchError(f"{operation.path}: a deleted file takes no lines, found {line!r}")
    elif line.startswith(MOVE):
        operation.move_path = _path(line[len(MOVE) :])
    elif line.startswith("@@"):
        operation.chunks.append(Chunk(line[2:].strip() or None))
    elif line.strip() == END_OF_FILE:
        _chunk(operation).at_end = True
    elif line[:1] in (" ", "-", "+") or line == "":
        chunk = _chunk(operation)
        kind, text = (line[:1] or " "), line[1:]
        if kind in (" ", "-"):
            chunk.old.append(text)
        if kind in (" ", "+"):
            chunk.new.append(text)
    else:
        raise PatchError(f"{operation.path}: unexpected line {line!r}")


def _chunk(operation: FileOperation) -> Chunk:
    if not operation.chunks:
        operation.chunks.append(Chunk(None))
    return operation.chunks[-1]


def updated_lines(lines: list[str], operation: FileOperation) -> list[str]:
    """The file's lines with the operation's chunks applied, in order."""
    result, position = list(lines), 0
    for chunk in operation.chunks:
        if chunk.anchor is not None:
            found = _find(result, [chunk.anchor], position)
            if found is None:
                raise PatchError(f"{operation.path}: the line '{chunk.anchor}' was not found")
            position = found + 1
        if not chunk.old:  # pure addition: at the anchor, or at the end
            at = len(result) if chunk.at_end or chunk.anchor is None else position
            result[at:at] = chunk.new
            position = at + len(chunk.new)
            continue
        old, new = chunk.old, chunk.new
        found = _find(result, old, position, from_end=chunk.at_end)
        while found is None and old and old[-1] == "" and new and new[-1] == "":
            old, new = old[:-1], new[:-1]  # a blank line before the next file operation is not context
            found = _find(result, old, position, from_end=chunk.at_end)
        if found is None:
            raise PatchError(f"{operation.path}: these lines were not found:\n" + "\n".join(chunk.old))
        result[found : found + len(old)] = new
        position = found + len(new)
    return result


def _find(lines: list[str], wanted: list[str], start: int, from_end: bool = False) -> int | None:
    """Where ``wanted`` stands from ``start`` (the last place, for a chunk at
    the end of the file): exactly, else ignoring trailing spaces, else
    ignoring all surrounding spaces."""
    places = range(start, len(lines) - len(wanted) + 1)
    for same in (lambda a, b: a == b, lambda a, b: a.rstrip() == b.rstrip(), lambda a, b: a.strip() == b.strip()):
        for index in reversed(places) if from_end else places:
            if all(same(lines[index + offset], line) for offset, line in enumerate(wanted)):
                return index
    return None


@dataclass
class _Text:
    lines: list[str]
    newline: str = "\n"  # a CRLF file is written back with CRLF


def _read(path: str) -> _Text:
    with open(path, encoding="utf-8", newline="") as file:
        text = file.read()
    newline = "\r\n" if "\r\n" in text else "\n"
    if not text:
        return _Text([], newline)
    lines = text.split(newline)
    return _Text(lines[:-1] if text.endswith(newline) else lines, newline)


DIFF_CHARS = 64 * 1024  # of each file's diff, shown and returned: the writer's reply stays small


def unified_diff(path: str, before: list[str], after: list[str], new_path: str | None = None) -> str:
    diff = "".join(
        difflib.unified_diff(
            [f"{line}\n" for line in before], [f"{line}\n" for line in after], f"a/{path}", f"b/{new_path or path}"
        )
    )
    return diff if len(diff) <= DIFF_CHARS else diff[:DIFF_CHARS] + "\n[… diff cut …]\n"


def apply(text: str) -> list[dict]:
    """Apply a patch in the current directory. Every file is read and every
    change computed first (a file changed twice in one patch changes twice);
    then each new content goes to a temporary file beside its target, and
    only once all are written are they renamed into place and the deleted
    files removed. Each change as the ``fileChange`` item shows it."""
    current: dict[str, _Text | None] = {}  # path -> its content as the patch has it so far (None: gone)

    def content(path: str) -> _Text | None:
        if path not in current:
            current[path] = _read(path) if os.path.exists(path) else None
        return current[path]

    changes = []
    for operation in parse(text):
        before = content(operation.path)
        if operation.kind == "add":
            if before is not None:
                raise PatchError(f"{operation.path}: already exists")
            after: _Text | None = _Text(operation.added)
        elif before is None:
            raise PatchError(f"{operation.path}: no such file")
        elif operation.kind == "delete":
            after = None
        else:
            after = _Text(updated_lines(before.lines, operation), before.newline)
        target = operation.move_path or operation.path
        if target != operation.path:
            current[operation.path] = None
        current[target] = after
        diff = unified_diff(operation.path, before.lines if before else [], after.lines if after else [], target)
        changes.append({"path": operation.path, "kind": operation.change_kind(), "diff": diff})
    _write_all(current)
    return changes


def _write_all(current: dict[str, _Text | None]) -> None:
    staged: list[tuple[str, str]] = []
    try:
        for path, text in current.items():
            if text is None:
                continue
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            temporary = os.path.join(directory, f".{os.path.basename(path)}.apply_patch.tmp")
            with open(temporary, "w", encoding="utf-8", newline="") as file:
                file.write(text.newline.join(text.lines) + (text.newline if text.lines else ""))
            staged.append((temporary, path))
    except BaseException:
        for temporary, _ in staged:
            os.remove(temporary)
        raise
    for temporary, path in staged:
        os.replace(temporary, path)
    for path, text in current.items():
        if text is None and os.path.exists(path):
            os.remove(path)


def main() -> int:
    """Inside the sandbox: the patch on stdin, ``{"changes": …}`` or ``{"error": …}`` on stdout."""
    try:
        print(json.dumps({"changes": apply(sys.stdin.read())}))
    except (PatchError, OSError, UnicodeDecodeError) as exc:
        print(json.dumps({"error": str(exc)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
