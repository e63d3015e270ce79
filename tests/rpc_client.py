"""The JSON-RPC client over channels' WebsocketCommunicator (in-process tests)."""

from channels.testing import WebsocketCommunicator

from codexserver.devtools.rpc_client import RpcClient, SocketClient

__all__ = ["CommunicatorClient", "SocketClient", "backend_then_ios"]


class CommunicatorClient(RpcClient):
    """Against the ASGI application in this process."""

    def __init__(self, communicator: WebsocketCommunicator):
        self.communicator = communicator
        # Our own timeouts cancel the wait; asgiref's would cancel the application.
        super().__init__(self._send, lambda: communicator.receive_from(timeout=3600))

    async def _send(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)


async def backend_then_ios(connect) -> tuple[CommunicatorClient, CommunicatorClient]:
    """The seed's order: ``codex-backend`` initializes first, ``codex_ios`` second."""
    backend = await connect()
    await backend.initialize("codex-backend", "2.0.0")
    ios = await connect()
    await ios.initialize("codex_ios", "1.4.0")
    return backend, ios
