"""ConnectionIdentity: one row per WebSocket connection (PROTOCOL §7); the
principals connections belong to and their tokens (§12).

Rows are data only; every change goes through ``identity.actions`` and
``identity.principals``.
"""

from django.db import models
from django.utils import timezone


class Principal(models.Model):
    """Whoever holds a token: every connection, thread and turn is one's."""

    name = models.CharField(max_length=150, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Directories its threads may work in (PROTOCOL §11); empty: the server's default.
    workspace_roots = models.JSONField(default=list, blank=True)
    # Total tokens its turns may use; then turn/start fails. Null: no budget.
    token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    # Tokens its turns used, stored and ephemeral alike: each turn's end adds its own.
    tokens_used = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return self.name


class AccessToken(models.Model):
    """A bearer token of a principal, kept only as its SHA-256 digest and a
    visible prefix (``identity.principals`` says why a fast hash)."""

    principal = models.ForeignKey(Principal, on_delete=models.PROTECT, related_name="tokens")
    name = models.CharField(max_length=150)
    prefix = models.CharField(max_length=16)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "token"
        constraints = [models.UniqueConstraint(fields=["principal", "name"], name="one_token_name_per_principal")]

    def __str__(self) -> str:
        return f"{self.principal} / {self.name} ({self.prefix}…)"


class ServerBoot(models.Model):
    """One run of one server process: its boot id and heartbeat (PROTOCOL §7).

    Instance names may repeat (two processes, or a restart); boot ids never
    do. A boot whose heartbeat stopped is dead, and its open rows are closed.
    """

    boot_id = models.UUIDField(unique=True, editable=False)
    server_instance = models.CharField(max_length=255)
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.server_instance} {self.boot_id}"


class ConnectionIdentity(models.Model):
    connection_id = models.UUIDField(unique=True, editable=False)
    principal = models.ForeignKey(Principal, on_delete=models.PROTECT, related_name="connections")
    server_instance = models.CharField(max_length=255, db_index=True)
    boot_id = models.UUIDField(null=True, blank=True, db_index=True, editable=False)
    client_name = models.CharField(max_length=256, blank=True, default="")
    client_title = models.CharField(max_length=512, null=True, blank=True)
    client_version = models.CharField(max_length=256, blank=True, default="")
    originator = models.CharField(max_length=256, blank=True, default="", db_index=True)
    user_agent = models.CharField(max_length=1024, blank=True, default="")
    is_infrastructure = models.BooleanField(default=False)
    is_first_party = models.BooleanField(default=False)
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    capabilities = models.JSONField(default=dict, blank=True)
    connected_at = models.DateTimeField(db_index=True)
    initialized_at = models.DateTimeField(null=True, blank=True)
    disconnected_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        verbose_name = "connection identity"
        verbose_name_plural = "connection identities"
        indexes = [
            # Stale-row reconciliation: open rows of one instance.
            models.Index(
                fields=["server_instance", "connected_at"],
                name="open_by_instance",
                condition=models.Q(disconnected_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.client_name or '(uninitialized)'} {self.connection_id}"

    @property
    def is_open(self) -> bool:
        return self.disconnected_at is None
