"""The JSON-RPC client over channels' WebsocketCommunicator (in-process tests)."""

from channels.testing import WebsocketCommunicator

from codexserver.devtools.rpc_client import RpcClient, SocketClient

__all__ = ["CommunicatorClient", "SocketClient"]


class CommunicatorClient(RpcClient):
    """Against the ASGI application in this process."""

    def __init__(self, communicator: WebsocketCommunicator):
        self.communicator = communicator
        # Our own timeouts cancel the wait; asgiref's would cancel the application.
        super().__init__(self._send, lambda: communicator.receive_from(timeout=3600))

    async def _send(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)
