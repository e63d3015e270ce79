"""``manage.py revoke_token PRINCIPAL NAME``: refuse a token from now on and
close its live connections on every process (PROTOCOL §12)."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from identity.principals import TokenError, revoke_token


class Command(BaseCommand):
    help = "Revoke PRINCIPAL's token NAME; its live connections close within seconds (code 1008)."

    def add_arguments(self, parser):
        parser.add_argument("principal")
        parser.add_argument("name", help="the token's name (see the admin, or the issue_token output)")

    def handle(self, *args, principal, name, **options):
        try:
            row, revoked_now = revoke_token(principal, name)
        except TokenError as exc:
            raise CommandError(str(exc)) from None
        if not revoked_now:
            self.stdout.write(f"token {row.name!r} ({row.prefix}…) of {principal!r} was already revoked, at {row.revoked_at}")
            return
        self.stdout.write(
            f"revoked token {row.name!r} ({row.prefix}…) of {principal!r}; its connections close within "
            f"{settings.CODEX_PRINCIPAL_CHECK_SECONDS:g} s on every process"
        )
