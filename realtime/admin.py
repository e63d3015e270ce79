"""Read-only admin for stored threads and turns (PROTOCOL §9).

The turn list answers the question attribution exists for: which client used
how many tokens. Above the list, usage totals per originator and client name
(over the turns the filters select: infrastructure clients share an
originator); each turn shows who started it (originator, client,
connection), its status, timing and token counts.
"""

from datetime import datetime
from datetime import timezone as dt_timezone

from django.contrib import admin
from django.db.models import Count, Sum

from identity.admin import NOT_YET, OriginatorFilter, ReadOnlyAdmin, admin_time

from .models import USAGE_FIELDS, StoredItem, StoredThread, StoredTurn

ORIGINATORS_SHOWN = 50


def _time_ms(value: int | None) -> str:
    return admin_time(datetime.fromtimestamp(value / 1000, dt_timezone.utc)) if value else NOT_YET


@admin.register(StoredThread)
class StoredThreadAdmin(ReadOnlyAdmin):
    list_display = (
        "thread", "principal", "preview", "originator", "model", "turns", "created", "updated", "running_turn_id",
    )  # fmt: skip
    list_display_links = ("thread",)
    search_fields = ("=thread_id", "=principal__name", "=originator", "preview")
    list_select_related = ("principal",)
    show_full_result_count = False
    list_per_page = 100

    @admin.display(description="thread")
    def thread(self, row: StoredThread) -> str:
        return row.thread_id[:8]

    @admin.display(description="turns", ordering="turn_sequence")
    def turns(self, row: StoredThread) -> int:
        return row.turn_sequence  # its newest turn's number: no count over the turns table

    @admin.display(description="created", ordering="created_at")
    def created(self, row: StoredThread) -> str:
        return admin_time(row.created_at)

    @admin.display(description="updated", ordering="updated_at")
    def updated(self, row: StoredThread) -> str:
        return admin_time(row.updated_at)


class StoredItemInline(admin.TabularInline):
    model = StoredItem
    fields = ("position", "item_type", "item")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(StoredTurn)
class StoredTurnAdmin(ReadOnlyAdmin):
    list_display = (
        "turn",
        "thread_link",
        "principal",
        "originator",
        "client_name",
        "connection",
        "status",
        "started",
        "duration",
        "input_tokens",
        "output_tokens",
        "total_tokens",
    )
    list_display_links = ("turn",)
    list_filter = ("status", OriginatorFilter)
    search_fields = ("=turn_id", "=thread__thread_id", "=principal__name", "=originator", "=connection_id")
    list_select_related = ("thread", "principal")
    ordering = ("-started_at_ms",)
    # Times as times, not milliseconds; model_input (encrypted reasoning) is large and of no use to read.
    fields = (
        "turn_id", "thread", "principal", "sequence", "originator", "client_name", "connection_id", "status", "error",
        "started", "completed", "duration", "input_tokens", "cached_input_tokens", "output_tokens",
        "reasoning_output_tokens", "total_tokens",
    )  # fmt: skip
    readonly_fields = fields
    inlines = (StoredItemInline,)
    show_full_result_count = False
    list_per_page = 100

    def get_queryset(self, request):
        return super().get_queryset(request).defer("model_input")

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None:
            response.context_data["usage_by_originator"] = (
                changelist.queryset.order_by()
                .values("originator", "client_name")
                .annotate(turns=Count("id"), **{name: Sum(column) for name, column in USAGE_FIELDS.items()})
                .order_by("-totalTokens", "originator", "client_name")[:ORIGINATORS_SHOWN]
            )
        return response

    @admin.display(description="turn")
    def turn(self, row: StoredTurn) -> str:
        return row.turn_id[:8]

    @admin.display(description="thread", ordering="thread__thread_id")
    def thread_link(self, row: StoredTurn) -> str:
        return row.thread.thread_id[:8]

    @admin.display(description="connection")
    def connection(self, row: StoredTurn) -> str:
        return str(row.connection_id)[:8]

    @admin.display(description="started", ordering="started_at_ms")
    def started(self, row: StoredTurn) -> str:
        return _time_ms(row.started_at_ms)

    @admin.display(description="completed")
    def completed(self, row: StoredTurn) -> str:
        return _time_ms(row.completed_at_ms)

    @admin.display(description="duration")
    def duration(self, row: StoredTurn) -> str:
        if row.completed_at_ms is None:
            return NOT_YET
        return f"{(row.completed_at_ms - row.started_at_ms) / 1000:.1f} s"
