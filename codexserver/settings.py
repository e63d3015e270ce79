"""Settings, read from the environment (PROTOCOL §6-7; README has the table).

Embedded default: SQLite file in the project and the in-memory channel layer.
DATABASE_URL and REDIS_URL switch to PostgreSQL and Redis for scale-out.
"""

import math
import os
import socket
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from codexserver.log_format import LOG_FORMAT

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


def _env_number(name: str, default: str, kind: type) -> int | float:
    """A number setting; anything else stops the process in one line naming it."""
    raw = os.environ.get(name, default).strip()
    try:
        value = kind(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r}: must be a {'whole number' if kind is int else 'number'}") from None
    if not math.isfinite(value) or value < 0:
        raise ImproperlyConfigured(f"{name}={raw!r}: must be a finite number, not negative")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, default).strip()
    value = raw.upper() if choices[0].isupper() else raw.lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r}: must be one of {', '.join(choices)}")
    return value


def _env_url(name: str, default: str) -> str:
    raw = os.environ.get(name, default).strip()
    if not raw.startswith(("http://", "https://")) or raw.endswith("://"):
        raise ImproperlyConfigured(f"{name}={raw!r}: must be an http:// or https:// URL")
    return raw


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = _env_bool("DJANGO_DEBUG")
# Without DJANGO_SECRET_KEY each process makes its own: fine for one local
# process, but sessions then do not survive restarts or span processes.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or get_random_secret_key()
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "identity",
    "realtime",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files from the app packages: no collectstatic
    # step, no separate file server for a deployment that only needs /admin/.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it answers a locked-out login.
    "axes.middleware.AxesMiddleware",
]

# Admin logins: after AXES_FAILURE_LIMIT wrong passwords for one user name
# from one address, that pair is locked out for AXES_COOLOFF_TIME (hours)
# and answered 429, the right password included.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = _env_number("CODEX_ADMIN_LOGIN_FAILURES", "5", int)
if AXES_FAILURE_LIMIT < 1:
    raise ImproperlyConfigured(f"CODEX_ADMIN_LOGIN_FAILURES={AXES_FAILURE_LIMIT}: must be at least 1 (0 would lock out every login)")
AXES_COOLOFF_TIME = _env_number("CODEX_ADMIN_LOCKOUT_HOURS", "0.25", float)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# A locked-out pair's cool-off is not restarted by more failures: a stranger
# who knows the user name (behind a proxy, everyone shares its address) could
# otherwise keep the account locked for good.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False

# Behind a TLS-terminating proxy (README, Deployment): cookies only over
# HTTPS, and the proxy's X-Forwarded-Proto says whether a request was.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _env_bool("DJANGO_SECURE_COOKIES")
if _env_bool("DJANGO_TRUST_X_FORWARDED_PROTO"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

ROOT_URLCONF = "codexserver.urls"
ASGI_APPLICATION = "codexserver.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Threads writing ConnectionIdentity rows (PostgreSQL; SQLite uses one).
CODEX_DB_WRITE_THREADS = _env_number("CODEX_DB_WRITE_THREADS", "8", int)
# On PostgreSQL the turn writes' session prepares its statements (0: binds
# them in the client, as Django does, for a pooler without prepared statements).
CODEX_DB_PREPARED_STATEMENTS = _env_bool("CODEX_DB_PREPARED_STATEMENTS", True)
# Threads reading threads, turns and items for clients, apart from the writers.
CODEX_DB_READ_THREADS = _env_number("CODEX_DB_READ_THREADS", "2", int)
if CODEX_DB_READ_THREADS < 1:
    raise ImproperlyConfigured("CODEX_DB_READ_THREADS must be at least 1")
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=0
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's psycopg pool: a connection per row write would cost a
    # PostgreSQL backend start each (PROTOCOL §7 rows at every connect/close).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        # every row-writer and store-reader thread keeps one, plus the request and admin threads
        "max_size": CODEX_DB_WRITE_THREADS + CODEX_DB_READ_THREADS + 4,
        "timeout": 30,
    }
    # Each connection is checked as the pool hands it out (an empty query):
    # after PostgreSQL restarts, fails over or drops sessions, the pool's
    # connections are dead, and without this each failed one request.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and IMMEDIATE transactions let several processes share the file
    # without "database is locked" under concurrent connects.
    # synchronous=NORMAL is WAL's usual setting: a commit is safe against a
    # crashed process, and only a power cut can lose the last ones; FULL's
    # fsync per commit made the row writer the bottleneck of every turn.
    # Connections stay open (a new one per call cost a third of the writer's
    # time): a SQLite connection is a file handle, not a server session.
    DATABASES["default"]["CONN_MAX_AGE"] = None
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

REDIS_URL = os.environ.get("REDIS_URL")
# How long a process's channel stays in a thread's group without rejoining:
# a live process rejoins every quarter of it; a dead one's leaves within it.
CODEX_CHANNEL_GROUP_EXPIRY_SECONDS = _env_number("CODEX_CHANNEL_GROUP_EXPIRY_SECONDS", "60", int)
if CODEX_CHANNEL_GROUP_EXPIRY_SECONDS < 4:
    raise ImproperlyConfigured("CODEX_CHANNEL_GROUP_EXPIRY_SECONDS must be at least 4")
if REDIS_URL:
    from codexserver.channel_layers import redis_host  # imports channels_redis: only for a Redis layer

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "codexserver.channel_layers.ResilientRedisChannelLayer",
            # capacity: messages a channel holds before sends to it are
            # dropped; a process channel takes every thread's batches.
            "CONFIG": {"hosts": [redis_host(REDIS_URL)], "capacity": 1000, "group_expiry": CODEX_CHANNEL_GROUP_EXPIRY_SECONDS},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
WHITENOISE_USE_FINDERS = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# `python manage.py test` hands over to pytest: one suite, one runner.
TEST_RUNNER = "codexserver.test_runner.PytestTestRunner"

# --- app-server -------------------------------------------------------------
CODEX_SERVER_INSTANCE = os.environ.get(
    "CODEX_SERVER_INSTANCE", f"{socket.gethostname()}-{os.getpid()}"
)
# The server's Codex home, reported by `initialize` (`codexHome`); the server
# keeps nothing there itself.
CODEX_HOME = os.path.abspath(os.path.expanduser(os.environ.get("CODEX_HOME") or "~/.codex"))
# Each process beats in the database this often; one silent for the timeout
# is dead, and its open rows are closed by whichever live process notices.
CODEX_HEARTBEAT_INTERVAL = _env_number("CODEX_HEARTBEAT_INTERVAL", "15", float)
CODEX_HEARTBEAT_TIMEOUT = _env_number("CODEX_HEARTBEAT_TIMEOUT", "60", float)
if not 0 < CODEX_HEARTBEAT_INTERVAL < CODEX_HEARTBEAT_TIMEOUT:
    # A silent-but-alive process would otherwise look dead and lose its rows.
    raise ImproperlyConfigured(
        f"CODEX_HEARTBEAT_INTERVAL={CODEX_HEARTBEAT_INTERVAL:g}: must be above 0 and below "
        f"CODEX_HEARTBEAT_TIMEOUT={CODEX_HEARTBEAT_TIMEOUT:g}"
    )
CODEX_ALLOWED_ORIGINS = _env_list("CODEX_ALLOWED_ORIGINS")
CODEX_WS_AUTH_TOKEN = os.environ.get("CODEX_WS_AUTH_TOKEN") or None
# Every this many seconds each process reads which of its live connections'
# tokens were revoked (it closes those, 1008) and their principals' budgets.
# A connection that upgraded during one check is seen at the next: it closes
# within two intervals and the read, so at most 2 s keeps that within 5 s.
CODEX_PRINCIPAL_CHECK_SECONDS = _env_number("CODEX_PRINCIPAL_CHECK_SECONDS", "1", float)
if not 0 < CODEX_PRINCIPAL_CHECK_SECONDS <= 2:
    raise ImproperlyConfigured(
        f"CODEX_PRINCIPAL_CHECK_SECONDS={CODEX_PRINCIPAL_CHECK_SECONDS:g}: must be above 0 and at most 2 "
        "(a revoked token's connections close within 5 s)"
    )

# --- upstreams (PROTOCOL §6) ------------------------------------------------
CODEX_API_BASE_URL = _env_url("CODEX_API_BASE_URL", "https://api.openai.com/v1")
CODEX_CHATGPT_BASE_URL = _env_url("CODEX_CHATGPT_BASE_URL", "https://chatgpt.com/backend-api")
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY") or None
CODEX_MODEL = os.environ.get("CODEX_MODEL", "gpt-5-codex")
CODEX_RESPONSES_TRANSPORT = _env_choice("CODEX_RESPONSES_TRANSPORT", "sse", ("sse", "websocket"))
# Retries of 5xx answers other than 503: tries in all, and the first backoff
# (doubled each time).
CODEX_UPSTREAM_MAX_TRIES = _env_number("CODEX_UPSTREAM_MAX_TRIES", "3", int)
CODEX_UPSTREAM_RETRY_BACKOFF = _env_number("CODEX_UPSTREAM_RETRY_BACKOFF", "0.5", float)
# Longest silence tolerated inside a model stream before it counts as cut.
CODEX_UPSTREAM_IDLE_TIMEOUT = _env_number("CODEX_UPSTREAM_IDLE_TIMEOUT", "300", float)
CODEX_UPSTREAM_CONNECT_TIMEOUT = _env_number("CODEX_UPSTREAM_CONNECT_TIMEOUT", "10", float)

# Every line names the connection and originator it was logged for (see
# codexserver/log_format.py); secrets are redacted from the final text.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"identity": {"()": "codexserver.log_format.IdentityLogFilter"}},
    "formatters": {
        "plain": {
            "()": "codexserver.log_format.RedactingFormatter",
            "format": LOG_FORMAT,
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["identity"]},
    },
    "root": {"handlers": ["console"], "level": _env_choice("CODEX_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))},
    "loggers": {
        # httpx logs every request line at INFO; keep it at WARNING.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}

# Telemetry batching: events per request, seconds between flushes, and how
# many events may wait before the oldest are dropped.
CODEX_TELEMETRY_MAX_BATCH = _env_number("CODEX_TELEMETRY_MAX_BATCH", "50", int)
CODEX_TELEMETRY_FLUSH_INTERVAL = _env_number("CODEX_TELEMETRY_FLUSH_INTERVAL", "5.0", float)
CODEX_TELEMETRY_MAX_BUFFERED = _env_number("CODEX_TELEMETRY_MAX_BUFFERED", "10000", int)

# What one connection may hold at once, so no client can starve the others
# of the shared upstream pool or the event loop.
CODEX_MAX_THREADS_PER_CONNECTION = _env_number("CODEX_MAX_THREADS_PER_CONNECTION", "256", int)
CODEX_MAX_RUNNING_TURNS_PER_CONNECTION = _env_number("CODEX_MAX_RUNNING_TURNS_PER_CONNECTION", "16", int)
# Bytes of earlier turns replayed as model input per thread (oldest dropped first).
CODEX_MAX_HISTORY_BYTES = _env_number("CODEX_MAX_HISTORY_BYTES", str(4 * 1024 * 1024), int)
# Bytes of threads' history kept per process for their next turn, so it need
# not be read back from the database (realtime.store.history_cache); 0: none.
CODEX_HISTORY_CACHE_BYTES = _env_number("CODEX_HISTORY_CACHE_BYTES", str(64 * 1024 * 1024), int)
# A thread's turn lock lapses this long after its process last extended it
# (every third of it): a process killed mid-turn frees its threads within it.
CODEX_TURN_LOCK_SECONDS = _env_number("CODEX_TURN_LOCK_SECONDS", "30", float)
CODEX_MODELS = _env_list("CODEX_MODELS")
CODEX_MAX_REQUESTS_IN_FLIGHT = _env_number("CODEX_MAX_REQUESTS_IN_FLIGHT", "64", int)
# --- the agent (PROTOCOL §11) --------------------------------------------------
# Model requests a turn may make (each tool step is one more).
CODEX_MAX_TOOL_STEPS = _env_number("CODEX_MAX_TOOL_STEPS", "100", int)
# A command that outlives this is killed.
CODEX_COMMAND_TIMEOUT = _env_number("CODEX_COMMAND_TIMEOUT", "600", float)
# danger-full-access runs commands unsandboxed: refused unless the operator says so.
CODEX_ALLOW_FULL_ACCESS = os.environ.get("CODEX_ALLOW_FULL_ACCESS") == "1"
# The API's hosted web search, as Codex's web_search modes: "cached" (its
# index only, Codex 0.169.0's default), "live" (the open web), "disabled".
CODEX_WEB_SEARCH = _env_choice("CODEX_WEB_SEARCH", "cached", ("cached", "live", "disabled"))
# A command session left running by a finished turn ends once its thread has
# had no subscriber on this process for this long.
CODEX_SESSION_IDLE_SECONDS = _env_number("CODEX_SESSION_IDLE_SECONDS", "600", float)
# Where threads may work (absolute paths); a principal's own roots replace these.
def _directory_served_from() -> list[str]:
    try:
        return [os.getcwd()]
    except FileNotFoundError:  # deleted under the process: no default root, so no tools
        return []


CODEX_WORKSPACE_ROOTS = [os.path.abspath(root) for root in _env_list("CODEX_WORKSPACE_ROOTS")] or _directory_served_from()

# WebSockets one process holds, and one peer address holds (behind a proxy
# without --proxy-headers, every client has the proxy's address; 0: no cap).
CODEX_MAX_CONNECTIONS = _env_number("CODEX_MAX_CONNECTIONS", "10000", int)
CODEX_MAX_CONNECTIONS_PER_PEER = _env_number("CODEX_MAX_CONNECTIONS_PER_PEER", "2500", int)
# Seconds a new TCP connection has to send its whole request head (the
# WebSocket upgrade's, or an HTTP request's): a client trickling a byte at a
# time would otherwise hold a socket for good.
CODEX_REQUEST_HEAD_SECONDS = _env_number("CODEX_REQUEST_HEAD_SECONDS", "10", float)

# Closed connection rows older than this many days are deleted (0: kept for good).
CODEX_CONNECTION_ROW_RETENTION_DAYS = _env_number("CODEX_CONNECTION_ROW_RETENTION_DAYS", "90", float)
# Frames of one connection read a second (bursts of as many): past that its
# next frame, and its socket, wait. The Codex TUI sends about 15 at start-up.
CODEX_MAX_FRAMES_PER_SECOND = _env_number("CODEX_MAX_FRAMES_PER_SECOND", "200", float)
# Turns and realtime calls (each holds upstream streams) of one principal
# on one process: half the shared upstream pool (2,048), so one principal's
# many connections leave the others room. 0: no cap.
CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL = _env_number("CODEX_MAX_UPSTREAM_STREAMS_PER_PRINCIPAL", "1024", int)
if CODEX_MAX_FRAMES_PER_SECOND <= 0:
    raise ImproperlyConfigured("CODEX_MAX_FRAMES_PER_SECOND must be above 0")
# Realtime calls one connection may hold open at once (each an upstream call and socket).
CODEX_MAX_REALTIME_CALLS_PER_CONNECTION = _env_number("CODEX_MAX_REALTIME_CALLS_PER_CONNECTION", "4", int)

# Seconds a client may read nothing while a turn waits for it to drain its
# queue; after that the queue fills and the client is dropped (1013).
CODEX_CLIENT_STALL_TIMEOUT = _env_number("CODEX_CLIENT_STALL_TIMEOUT", "10", float)
