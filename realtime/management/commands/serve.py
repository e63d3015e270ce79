"""``python manage.py serve``: daphne on 127.0.0.1:8765 with the limits the protocol needs."""

import socket

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from realtime.rpc.protocol import MAX_FRAME_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class Command(BaseCommand):
    help = "Serve the app-server (HTTP + WebSocket) with daphne."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
        parser.add_argument(
            "daphne_args", nargs="*", help="further daphne options, after `--` (e.g. -- --proxy-headers)"
        )

    def handle(self, *args, host, port, daphne_args, **options):
        from codexserver.daphne_server import AppServerCommandLine

        argv = daphne_argv(host, port, daphne_args)
        if not settings.OPENAI_API_KEY:
            self.stderr.write("warning: OPENAI_API_KEY is not set: model turns will fail with `unauthorized`")
        _check_can_listen(host, port)
        self.stdout.write(f"codexserver listening on ws://{host}:{port}/ (admin at http://{host}:{port}/admin/)")
        AppServerCommandLine().run(argv)


def daphne_argv(host: str, port: int, extra: list[str]) -> list[str]:
    """daphne's command line: the protocol's limits, then the operator's options."""
    return [
        "--bind", host,
        "--port", str(port),
        # Frames over 1 MiB close the connection with 1009 (PROTOCOL §3).
        "--websocket-max-message-size", str(MAX_FRAME_BYTES),
        "--websocket-max-frame-size", str(MAX_FRAME_BYTES),
        "--ping-interval", "20",
        "--ping-timeout", "30",
        "--application-close-timeout", "10",
        # No fixed lifetime (daphne's default closes every socket after 24 h):
        # IDE sessions stay open for days; dead peers fail the ping (PROTOCOL §2).
        "--websocket_timeout", "-1",
        *extra,
        "codexserver.asgi:application",
    ]


def _check_can_listen(host: str, port: int) -> None:
    """Fail in one line before saying "listening" when the address is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
