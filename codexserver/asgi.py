"""ASGI entry point: HTTP goes to Django, the WebSocket at ``/`` to the app-server."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "codexserver.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_http = get_asgi_application()  # sets Django up before the imports below

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from realtime.transport.consumers import AppServerConsumer, no_such_path  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_http,
        # Anywhere but `/` is 404 before any auth (channels' router would
        # raise, and daphne log an error with a traceback and answer 500).
        "websocket": URLRouter([path("", AppServerConsumer.as_asgi()), re_path(r"", no_such_path)]),
    }
)
