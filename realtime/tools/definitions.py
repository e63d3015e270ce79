"""The tools offered to the model, under Codex 0.169.0's names and parameters
(../shared/fixtures/codex-0.169.0/model-request.json): models are trained on
those. The descriptions and instructions are this project's own."""

from __future__ import annotations

from typing import Any

EXEC_COMMAND = "exec_command"
WRITE_STDIN = "write_stdin"
REQUEST_USER_INPUT = "request_user_input"
VIEW_IMAGE = "view_image"

DEFAULT_YIELD_MS = 10_000
MIN_YIELD_MS, MAX_YIELD_MS = 250, 30_000
DEFAULT_MAX_OUTPUT_TOKENS = 10_000


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": description,
        "strict": False,
        "parameters": {"type": "object", "properties": properties, "required": required, "additionalProperties": False},
    }


COMMAND_TOOLS: tuple[dict[str, Any], ...] = (
    _function(
        EXEC_COMMAND,
        "Run a shell command in the workspace, inside a sandbox. Returns its output and exit code, or a session id "
        "if it is still running after yield_time_ms (poll it, or type into it, with write_stdin).",
        {
            "cmd": {"type": "string", "description": "The shell command line."},
            "workdir": {"type": "string", "description": "Directory to run in; the thread's working directory if omitted."},
            "yield_time_ms": {"type": "number", "description": "How long to wait for output before returning (250 to 30000; 10000 if omitted)."},
            "max_output_tokens": {"type": "number", "description": "Most output to return, in tokens (10000 if omitted)."},
            "tty": {"type": "boolean", "description": "Ignored: commands run with pipes."},
            "login": {"type": "boolean", "description": "Run the shell as a login shell (true if omitted)."},
            "shell": {"type": "string", "description": "The shell to run the command with (/bin/bash if omitted)."},
            "sandbox_permissions": {
                "type": "string",
                "description": "use_default, or require_escalated to ask the user to run it outside the sandbox.",
                "enum": ["use_default", "require_escalated"],
            },
            "justification": {"type": "string", "description": "With require_escalated: why, in one sentence for the user."},
            "prefix_rule": {
                "type": "array",
                "description": "With require_escalated: a command prefix the user may approve for the rest of the thread.",
                "items": {"type": "string"},
            },
        },
        ["cmd"],
    ),
    _function(
        WRITE_STDIN,
        "Write characters to a running command session, or poll it with no characters; returns the output since the last call.",
        {
            "session_id": {"type": "number", "description": "The session id exec_command returned."},
            "chars": {"type": "string", "description": "Characters to write to its standard input; empty to only poll."},
            "yield_time_ms": {"type": "number", "description": "How long to wait for output before returning."},
            "max_output_tokens": {"type": "number", "description": "Most output to return, in tokens."},
        },
        ["session_id"],
    ),
    _function(
        REQUEST_USER_INPUT,
        "Ask the user up to three short questions when you cannot go on without their choice; returns their answers.",
        {
            "questions": {
                "type": "array",
                "description": "The questions, one or a few.",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "description": "A stable id for the answer (snake_case)."},
                        "header": {"type": "string", "description": "A short label, 12 characters at most."},
                        "question": {"type": "string", "description": "The question, in one sentence."},
                        "options": {
                            "type": "array",
                            "description": "Two or three choices, the one you suggest first.",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "label": {"type": "string", "description": "The choice, in a few words."},
                                    "description": {"type": "string", "description": "What it means, in one sentence."},
                                },
                                "required": ["label", "description"],
                                "additionalProperties": False,
                            },
                        },
                    },
                    "required": ["id", "header", "question", "options"],
                    "additionalProperties": False,
                },
            }
        },
        ["questions"],
    ),
    _function(
        VIEW_IMAGE,
        "Look at an image file of the workspace (PNG, JPEG, GIF or WebP, up to 720 KiB).",
        {"path": {"type": "string", "description": "The image's path, absolute or relative to the working directory."}},
        ["path"],
    ),
)

def offered_tools(web_search: str, dynamic: tuple[dict[str, Any], ...] = ()) -> tuple[dict[str, Any], ...]:
    """What a thread with tools offers the model: the server's own tools, the
    API's hosted search as Codex 0.169.0 offers it (``CODEX_WEB_SEARCH``),
    and the tools its client declared."""
    hosted = () if web_search == "disabled" else ({"type": "web_search", "external_web_access": web_search == "live"},)
    return (*COMMAND_TOOLS, *hosted, *dynamic)


AGENT_INSTRUCTIONS = """\
You are a coding agent working in the user's workspace through this server. \
Use exec_command to inspect and change files and to run programs; prefer small, \
verifiable steps, and say what you did and what you found. Commands run in a \
sandbox: when one fails for lack of permission, explain what you need instead of \
working around it."""


def environment_context(cwd: str, sandbox_mode: str, network_access: bool, approval_policy: Any) -> str:
    """What the model is told of where its commands run, each request."""
    return (
        "<environment_context>\n"
        f"  <cwd>{cwd}</cwd>\n"
        "  <shell>bash</shell>\n"
        f"  <sandbox_mode>{sandbox_mode}</sandbox_mode>\n"
        f"  <network_access>{'enabled' if network_access else 'restricted'}</network_access>\n"
        f"  <approval_policy>{approval_policy if isinstance(approval_policy, str) else 'granular'}</approval_policy>\n"
        "</environment_context>"
    )
