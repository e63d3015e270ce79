"""``python manage.py serve``: daphne on 127.0.0.1:8765 with the limits the protocol needs."""

import ipaddress
import socket

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from identity.principals import tokens_configured
from realtime.rpc.protocol import MAX_FRAME_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class Command(BaseCommand):
    help = "Serve the app-server (HTTP + WebSocket) with daphne."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
        parser.add_argument(
            "--allow-unauthenticated",
            action="store_true",
            help="listen beyond loopback although no token is configured: anyone who reaches the port "
            "is the local principal and sees its threads",
        )
        parser.add_argument(
            "--local-model",
            action="store_true",
            help="answer every model request from a scripted local model in this process (no network, no key): "
            "to try the server and its clients offline; never for real work",
        )
        parser.add_argument(
            "daphne_args", nargs="*", help="further daphne options, after `--` (e.g. -- --proxy-headers)"
        )

    def handle(self, *args, host, port, daphne_args, allow_unauthenticated=False, local_model=False, **options):
        from codexserver.daphne_server import AppServerCommandLine

        refusal = refusal_to_listen(host, allow_unauthenticated, daphne_args)
        if refusal is not None:
            raise CommandError(refusal)
        argv = daphne_argv(host, port, daphne_args)
        if local_model:
            self._use_local_model()
        elif not settings.OPENAI_API_KEY:
            self.stderr.write(
                f"warning: OPENAI_API_KEY is not set: model requests go to {settings.CODEX_API_BASE_URL} without a key "
                "(the OpenAI API answers 401, so turns fail `unauthorized`; with no network, they fail to connect)"
            )
        _check_can_listen(host, port)
        self.stdout.write(f"codexserver listening on ws://{host}:{port}/ (admin at http://{host}:{port}/admin/)")
        AppServerCommandLine().run(argv)

    def _use_local_model(self) -> None:
        """Every upstream (model, realtime, telemetry, connectors) is the
        local scripted one (codexserver/devtools/local_upstream.py), started
        in this process: "hi" gets "Hello world", `exec[ls]` runs `ls`, and
        its docstring lists the rest."""
        from codexserver.devtools.local_upstream import UpstreamServer

        upstream = UpstreamServer(max_records=1000).start()
        settings.CODEX_API_BASE_URL = upstream.api_base_url
        settings.CODEX_CHATGPT_BASE_URL = upstream.chatgpt_base_url
        settings.OPENAI_API_KEY = settings.OPENAI_API_KEY or "local-model"
        self.stderr.write(
            f"LOCAL MODEL: every model request is answered by a scripted local model at {upstream.api_base_url}, "
            "not by OpenAI (try `hi`, or `exec[ls]` to see a command run). For trying the server offline only."
        )


UPGRADE_TIMEOUT_SECONDS = 20


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
        # An upgrade may wait this long for its row and channel (daphne's
        # default is 5 s, then it drops the socket without an answer): in a
        # reconnect storm (1,000 clients at once on 2 busy cores) the last
        # upgrades queue past 5 s, and a dropped client only comes back to
        # queue again.
        "--websocket_connect_timeout", str(UPGRADE_TIMEOUT_SECONDS),
        # No fixed lifetime (daphne's default closes every socket after 24 h):
        # IDE sessions stay open for days; dead peers fail the ping (PROTOCOL §2).
        "--websocket_timeout", "-1",
        *extra,
        "codexserver.asgi:application",
    ]


# daphne's own ways to choose where it listens, after `--`.
BINDING_OPTIONS = ("--bind", "--unix-socket", "--fd", "--endpoint")
SHORT_BINDING_OPTIONS = ("-b", "-u", "-e")


def _rebinds(daphne_args) -> bool:
    return any(
        arg.split("=", 1)[0] in BINDING_OPTIONS or (arg[:2] in SHORT_BINDING_OPTIONS and not arg.startswith("--"))
        for arg in daphne_args
    )


def refusal_to_listen(host: str, allow_unauthenticated: bool, daphne_args: tuple[str, ...] = ()) -> str | None:
    """Why ``serve`` must not listen on ``host`` (or where ``daphne_args``
    bind it), or None (PROTOCOL §12): with no token configured, everyone who
    reaches the port is the local principal, which is only safe on loopback."""
    rebinds = _rebinds(daphne_args)
    if allow_unauthenticated or (_is_loopback(host) and not rebinds) or _tokens_configured():
        return None
    where = "an address daphne's options choose" if rebinds else host
    return (
        f"refusing to listen on {where}: no token is configured, so anyone who reaches it would be the local "
        "principal and see its threads. Issue one (manage.py issue_token NAME) or set CODEX_WS_AUTH_TOKEN, "
        "or pass --allow-unauthenticated if only trusted clients can reach this address."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _tokens_configured() -> bool:
    try:
        return tokens_configured()
    except DatabaseError:  # not migrated yet: no token can have been issued
        return bool(settings.CODEX_WS_AUTH_TOKEN)


def _check_can_listen(host: str, port: int) -> None:
    """Fail in one line before saying "listening" when the address is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
