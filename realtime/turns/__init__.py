"""A turn from ``turn/start`` to its end: the runner (model request, retries,
storing the end) and the translator from Responses stream events to the
schema's items and notifications. The agent loop belongs here."""
