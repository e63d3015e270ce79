"""One handler per method: ``async def handler(context, params) -> result``."""

from collections.abc import Awaitable, Callable
from typing import Any

from . import initialize, threads, turns

INITIALIZE = "initialize"

Handler = Callable[[Any, Any], Awaitable[Any]]

HANDLERS: dict[str, Handler] = {
    INITIALIZE: initialize.initialize,
    "thread/start": threads.start_thread,
    "turn/start": turns.start_turn,
    "turn/interrupt": turns.interrupt_turn,
}
