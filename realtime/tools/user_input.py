"""``request_user_input``: the model asks the people on the thread a few
questions, and gets their answers (PROTOCOL §11). The question goes out as
the server request ``item/tool/requestUserInput`` to every subscriber of
the thread; the first answer is the model's."""

from __future__ import annotations

import json
from typing import Any

from .commands import CallRefused, CommandContext

MAX_QUESTIONS = 3


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CallRefused(f"request_user_input: each question needs {name}, a non-empty string")
    return value


def _question(question: Any) -> dict[str, Any]:
    if not isinstance(question, dict):
        raise CallRefused("request_user_input: each question is an object")
    options = question.get("options")
    return {
        "id": _text(question.get("id"), "id"),
        "header": _text(question.get("header"), "header"),
        "question": _text(question.get("question"), "question"),
        "isOther": True,  # the client offers a free-form answer besides the options
        "isSecret": False,
        "options": [
            {"label": _text(option.get("label"), "an option label"), "description": str(option.get("description") or "")}
            for option in options
            if isinstance(option, dict)
        ]
        if isinstance(options, list)
        else None,
    }


async def request_user_input(context: CommandContext, call_id: str, arguments: dict[str, Any]) -> str:
    questions = arguments.get("questions")
    if not isinstance(questions, list) or not questions:
        raise CallRefused("request_user_input needs questions, a non-empty array")
    if context.ask is None:
        raise CallRefused("nobody can be asked on this thread")
    params = {
        "threadId": context.thread_id,
        "turnId": context.turn_id,
        "itemId": call_id,
        "isBlocking": True,
        "questions": [_question(question) for question in questions[:MAX_QUESTIONS]],
    }
    answer = await context.ask("item/tool/requestUserInput", params)
    answers = answer.get("answers") if isinstance(answer, dict) else None
    if not isinstance(answers, dict):
        return "the user did not answer"
    return json.dumps({"answers": answers})
