"""The Responses stream's event types that end a stream or decide a retry,
shared by the request logic (``responses``) and both transports."""

COMPLETED = "response.completed"
INCOMPLETE = "response.incomplete"
FAILED_EVENTS = ("response.failed", "error")
TERMINAL_EVENTS = (COMPLETED, INCOMPLETE, *FAILED_EVENTS)
# Events that put nothing in front of the client: a failure after only these
# may still be retried (PROTOCOL §10).
NOT_CLIENT_OUTPUT = frozenset({"response.created", "response.in_progress", "response.queued"})
