"""Close ConnectionIdentity rows left open by a process that died."""

import argparse
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_duration

from identity.actions import close_stale_connections


def _duration(value: str) -> timedelta:
    # "90" (seconds), "15m", "2h", "1d", or Django's "HH:MM:SS" / ISO 8601 forms.
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return timedelta(seconds=int(value[:-1]) * units[value[-1]])
    if value.isdigit():
        return timedelta(seconds=int(value))
    parsed = parse_duration(value)
    if parsed is None:
        # argparse turns this into a one-line usage error.
        raise argparse.ArgumentTypeError(f"cannot read {value!r} as a duration (e.g. 90, 15m, 2h, 1d)")
    return parsed


class Command(BaseCommand):
    help = "Set disconnected_at on open connection rows (of one instance, or older than a duration)."

    def add_arguments(self, parser):
        parser.add_argument("--instance", help="only rows of this server_instance")
        parser.add_argument(
            "--older-than", type=_duration, help="only rows connected before now minus this (e.g. 15m, 2h, 1d)"
        )

    def handle(self, *args, instance=None, older_than=None, **options):
        if instance is None and older_than is None:
            raise CommandError(
                "say which rows: --instance NAME and/or --older-than DURATION "
                "(closing every open row would also close live connections)"
            )
        connected_before = timezone.now() - older_than if older_than is not None else None
        closed = close_stale_connections(instance, connected_before)
        self.stdout.write(f"closed {closed} stale connection row(s)")
