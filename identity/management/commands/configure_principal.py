"""``manage.py configure_principal PRINCIPAL``: its token budget and workspace roots."""

import os

from django.core.management.base import BaseCommand, CommandError

from identity.models import Principal
from identity.principals import TokenError, principal_name_of


class Command(BaseCommand):
    help = "Set PRINCIPAL's token budget and workspace roots (created if new); with no option, print them."

    def add_arguments(self, parser):
        parser.add_argument("principal")
        budget = parser.add_mutually_exclusive_group()
        budget.add_argument("--budget", type=int, help="total tokens its turns may use; then turn/start fails")
        budget.add_argument("--no-budget", action="store_true", help="no token budget")
        parser.add_argument(
            "--workspace-root", action="append", dest="roots", metavar="DIR",
            help="a directory its threads may work in (repeat for several; replaces the list)",
        )  # fmt: skip

    def handle(self, *args, principal, budget=None, no_budget=False, roots=None, **options):
        if budget is not None and budget < 0:
            raise CommandError("--budget is a number of tokens, 0 or more")
        if roots is not None and not all(os.path.isabs(root) for root in roots):
            raise CommandError("--workspace-root takes absolute paths")
        try:
            principal = principal_name_of(principal)
        except TokenError as exc:
            raise CommandError(str(exc)) from None
        row, _ = Principal.objects.get_or_create(name=principal)
        if budget is not None or no_budget:
            row.token_budget = None if no_budget else budget
        if roots is not None:
            row.workspace_roots = [os.path.normpath(root) for root in roots]
        row.save()
        budget_text = "none" if row.token_budget is None else f"{row.token_budget} tokens"
        self.stdout.write(f"{row.name}: budget {budget_text}; workspace roots {row.workspace_roots or 'the default'}")
