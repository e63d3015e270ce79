"""Threads, turns and items in the database (PROTOCOL §9).

Rows are data only; every read and write goes through ``realtime.thread_store``.
Ephemeral threads are never stored: the schema says they are not materialized.
"""

from django.db import models

from identity.models import Principal

# Token counts of a turn, by the schema's TokenUsageBreakdown names.
USAGE_FIELDS = {
    "inputTokens": "input_tokens",
    "cachedInputTokens": "cached_input_tokens",
    "outputTokens": "output_tokens",
    "reasoningOutputTokens": "reasoning_output_tokens",
    "totalTokens": "total_tokens",
}


def default_approval_policy() -> str:
    return "on-request"  # Codex's own default


class StoredThread(models.Model):
    thread_id = models.CharField(max_length=64, unique=True, editable=False)
    # Whose: only its principal's connections list, read, resume or continue it.
    principal = models.ForeignKey(Principal, on_delete=models.PROTECT, related_name="threads")
    model = models.CharField(max_length=256)
    model_provider = models.CharField(max_length=64)
    cwd = models.TextField()
    originator = models.CharField(max_length=256, db_index=True, help_text="of the connection that started it")
    base_instructions = models.TextField(null=True, blank=True)
    # What its commands may do (PROTOCOL §11), as thread/start chose.
    sandbox_mode = models.CharField(max_length=32, default="read-only")
    network_access = models.BooleanField(default=False)
    approval_policy = models.JSONField(default=default_approval_policy)
    preview = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField(db_index=True)
    read_revision = models.PositiveIntegerField(default=0)
    # The sequence number of its newest turn, assigned by the database as the
    # turn's lock is taken: turns are ordered by it, never by a host's clock.
    # (A database default too: a process of the previous release, still
    # running during a rolling deploy, inserts rows without the column.)
    turn_sequence = models.PositiveBigIntegerField(default=0, db_default=0)
    # The deployment-wide turn lock: the running turn, the channel of the
    # process running it (turn/interrupt from elsewhere goes there) and when
    # the lock lapses unless that process keeps extending it.
    running_turn_id = models.CharField(max_length=64, null=True, blank=True)
    running_channel = models.CharField(max_length=200, null=True, blank=True)
    lock_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "thread"
        ordering = ["-updated_at"]
        indexes = [
            # thread/list: a principal's threads, most recently updated first.
            models.Index(fields=["principal", "-updated_at", "-id"], name="threads_of_principal"),
            # The heartbeat's sweep for turns of processes that died: held locks only.
            models.Index(
                fields=["lock_expires_at"], name="held_turn_locks", condition=models.Q(running_turn_id__isnull=False)
            ),
        ]

    def __str__(self) -> str:
        return self.preview[:60] or self.thread_id


class StoredTurn(models.Model):
    turn_id = models.CharField(max_length=64, unique=True, editable=False)
    thread = models.ForeignKey(StoredThread, on_delete=models.CASCADE, related_name="turns")
    # Its thread's principal, kept here for usage per principal and its budget.
    principal = models.ForeignKey(Principal, on_delete=models.PROTECT, related_name="turns")
    # Identity is the request's: the connection that sent turn/start.
    originator = models.CharField(max_length=256, db_index=True)
    # and its clientInfo.name: infrastructure clients share an originator (PROTOCOL §5).
    client_name = models.CharField(max_length=256, blank=True, default="", db_default="")
    connection_id = models.UUIDField()
    status = models.CharField(max_length=16)
    # Its place in its thread (1, 2, …; ``StoredThread.turn_sequence``): the
    # conversation's order, whatever the clocks of the hosts that ran it say.
    sequence = models.PositiveBigIntegerField(default=0, db_default=0)
    error = models.JSONField(null=True, blank=True)
    started_at_ms = models.BigIntegerField()
    completed_at_ms = models.BigIntegerField(null=True, blank=True)
    # Responses API input items of this turn (user message, reply, reasoning
    # with its encrypted content), replayed by later turns.
    model_input = models.JSONField(default=list)
    input_bytes = models.PositiveIntegerField(default=0)
    has_usage = models.BooleanField(default=False)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_output_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = "turn"
        indexes = [
            models.Index(fields=["thread", "sequence"], name="turns_of_thread_in_order"),
            # The admin's turn list, newest first, and its usage per client.
            models.Index(fields=["-started_at_ms"], name="turns_newest_first"),
        ]

    def __str__(self) -> str:
        return self.turn_id

    def usage(self) -> dict[str, int] | None:
        if not self.has_usage:
            return None
        return {name: getattr(self, column) for name, column in USAGE_FIELDS.items()}


class StoredItem(models.Model):
    """One ThreadItem (schema shape) of a turn: user message, reply, reasoning."""

    turn = models.ForeignKey(StoredTurn, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveIntegerField()
    item_type = models.CharField(max_length=64)
    item = models.JSONField()
    started_at_ms = models.BigIntegerField()
    completed_at_ms = models.BigIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "item"
        ordering = ["turn_id", "position"]
        constraints = [models.UniqueConstraint(fields=["turn", "position"], name="one_item_per_position")]

    def __str__(self) -> str:
        return f"{self.position}: {self.item_type}"
