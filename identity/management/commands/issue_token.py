"""``manage.py issue_token PRINCIPAL [--name NAME]``: a new token, printed once (PROTOCOL §12)."""

from django.core.management.base import BaseCommand, CommandError

from identity.principals import TokenError, issue_token


class Command(BaseCommand):
    help = "Issue a token for PRINCIPAL (created if new). The token is printed once, alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("principal", help="the principal's name (e.g. alice)")
        parser.add_argument("--name", help="the token's name, to revoke it by (default: its visible prefix)")

    def handle(self, *args, principal, name=None, **options):
        try:
            row, token = issue_token(principal, name)
        except TokenError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"issued token {row.name!r} ({row.prefix}…) for principal {row.principal.name!r}.")
        self.stdout.write(
            "It is shown only now; the server keeps its hash. Clients send it as Authorization: Bearer <token>."
        )
        self.stdout.write(token)
