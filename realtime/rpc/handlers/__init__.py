"""One handler per method: ``async def handler(context, params) -> result``."""

from collections.abc import Awaitable, Callable
from typing import Any

from . import client_config, initialize, listings, realtime_calls, threads, turns

INITIALIZE = "initialize"
INTERRUPT = "turn/interrupt"

Handler = Callable[[Any, Any], Awaitable[Any]]

HANDLERS: dict[str, Handler] = {
    INITIALIZE: initialize.initialize,
    # start-up reads of a Codex client (PROTOCOL §8)
    "account/read": client_config.read_account,
    "model/list": client_config.list_models,
    "config/read": client_config.read_config,
    "configRequirements/read": client_config.read_config_requirements,
    "hooks/list": client_config.list_hooks,
    "skills/list": client_config.list_skills,
    "plugin/installed": client_config.list_installed_plugins,
    "collaborationMode/list": client_config.list_collaboration_modes,
    "account/bedrock/checkGovCloudRequirements": client_config.check_gov_cloud_requirements,
    # threads (PROTOCOL §5, §9)
    "thread/start": threads.start_thread,
    "thread/resume": threads.resume_thread,
    "thread/unsubscribe": threads.unsubscribe_thread,
    "thread/list": threads.list_threads,
    "thread/read": threads.read_thread,
    "thread/turns/list": threads.list_thread_turns,
    "thread/items/list": threads.list_thread_items,
    "thread/loaded/list": threads.list_loaded_threads,
    "thread/readState/update": threads.update_read_state,
    "thread/goal/get": threads.get_thread_goal,
    "thread/backgroundTerminals/list": threads.list_background_terminals,
    "thread/backgroundTerminals/terminate": threads.terminate_background_terminal,
    "thread/backgroundTerminals/clean": threads.clean_background_terminals,
    "turn/start": turns.start_turn,
    INTERRUPT: turns.interrupt_turn,
    "thread/realtime/start": realtime_calls.start_realtime,
    "thread/realtime/stop": realtime_calls.stop_realtime,
    "app/list": listings.list_app_connectors,
    "plugin/list": listings.list_plugin_entries,
}

# Requests that read the store (and on SQLite share its one thread with every
# upgrade's row and every turn's writes): a connection runs only a few at
# once, so one client's flood of listings cannot queue ahead of everyone.
STORE_READS = frozenset(
    {"thread/resume", "thread/list", "thread/read", "thread/turns/list", "thread/items/list", "thread/goal/get"}
)
