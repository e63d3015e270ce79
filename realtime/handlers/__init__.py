"""One handler per method: ``async def handler(context, params) -> result``."""

from collections.abc import Awaitable, Callable
from typing import Any

from . import initialize, listings, realtime_calls, threads, turns

INITIALIZE = "initialize"

Handler = Callable[[Any, Any], Awaitable[Any]]

HANDLERS: dict[str, Handler] = {
    INITIALIZE: initialize.initialize,
    "thread/start": threads.start_thread,
    "turn/start": turns.start_turn,
    "turn/interrupt": turns.interrupt_turn,
    "thread/realtime/start": realtime_calls.start_realtime,
    "thread/realtime/stop": realtime_calls.stop_realtime,
    "app/list": listings.list_app_connectors,
    "plugin/list": listings.list_plugin_entries,
}
