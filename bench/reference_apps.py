"""What the app-server is measured against, as ASGI applications.

- ``baseline_relay``: a minimal Channels consumer that relays the same
  upstream stream and sends the same notifications, with ONE process-global
  httpx client and no identity at all: no validation, no per-connection
  headers, no scope, no database row, no telemetry. Its client has the
  server's transport and pool limits (httpx-aiohttp), so the comparison
  measures identity, not a transport.
- ``echo``: a bare Channels consumer that sends every frame back.

Served with ``daphne bench.reference_apps:baseline_relay`` (or ``:echo``);
uvicorn can serve ``:echo`` too.
"""

import asyncio
import json
import os
import uuid

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "codexserver.settings")
django.setup()

import httpx  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from httpx_aiohttp import AiohttpTransport  # noqa: E402
from httpx_sse import aconnect_sse  # noqa: E402

from identity.http_clients import DEFAULT_LIMITS  # noqa: E402

_shared_client: httpx.AsyncClient | None = None  # the global the real server refuses to have


def shared_client() -> httpx.AsyncClient:
    global _shared_client
    if _shared_client is None:
        _shared_client = httpx.AsyncClient(
            base_url=os.environ["CODEX_API_BASE_URL"], timeout=300, transport=AiohttpTransport(limits=DEFAULT_LIMITS)
        )
    return _shared_client


class BaselineRelayConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        message = json.loads(text_data)
        if "id" not in message:
            return
        method, params = message.get("method"), message.get("params") or {}
        if method == "initialize":
            result = {"userAgent": "baseline", "platformFamily": "unix", "platformOs": "linux"}
        elif method == "thread/start":
            result = {"thread": {"id": str(uuid.uuid4()), "createdAt": 0, "model": "m"}}
        elif method == "turn/start":
            turn_id = str(uuid.uuid4())
            result = {"turn": {"id": turn_id, "status": "inProgress"}}
            await self._reply(message["id"], result)
            text = params["input"][0]["text"]
            asyncio.get_running_loop().create_task(self._relay(params["threadId"], turn_id, text))
            return
        else:
            result = {}
        await self._reply(message["id"], result)

    async def _reply(self, request_id, result):
        await self.send(json.dumps({"id": request_id, "result": result}))

    async def _notify(self, method, params):
        await self.send(json.dumps({"method": method, "params": params}))

    async def _relay(self, thread_id, turn_id, text):
        await self._notify("turn/started", {"threadId": thread_id, "turn": {"id": turn_id, "status": "inProgress"}})
        body = {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}], "stream": True}
        item_id = str(uuid.uuid4())
        await self._notify("item/started", {"threadId": thread_id, "turnId": turn_id, "item": {"id": item_id, "type": "agentMessage", "text": ""}})
        reply = []
        async with aconnect_sse(shared_client(), "POST", "responses", json=body) as source:
            async for sse in source.aiter_sse():
                event = json.loads(sse.data)
                if event.get("type") == "response.output_text.delta":
                    reply.append(event["delta"])
                    await self._notify("item/agentMessage/delta", {"threadId": thread_id, "turnId": turn_id, "itemId": item_id, "delta": event["delta"]})
        await self._notify("item/completed", {"threadId": thread_id, "turnId": turn_id, "item": {"id": item_id, "type": "agentMessage", "text": "".join(reply)}})
        await self._notify("turn/completed", {"threadId": thread_id, "turn": {"id": turn_id, "status": "completed"}})


class EchoConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data, bytes_data=bytes_data)


baseline_relay = BaselineRelayConsumer.as_asgi()
echo = EchoConsumer.as_asgi()
