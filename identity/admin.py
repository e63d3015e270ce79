"""Read-only admin for ConnectionIdentity: operators inspect, never edit.

It answers "who is connected now" at a glance: open connections are the
default view, one row fits a 1920 px screen, times carry seconds and zone,
and a connection that has not initialized shows "—", not "no". Filters list
only bounded sets (the first-party originators, never every name a client
ever chose); anything else is a search.
"""

from django.contrib import admin
from django.db.models import F
from django.utils import timezone

from .models import ConnectionIdentity
from .policy import first_party_originators, process_default_originator

NOT_YET = "—"


class StateFilter(admin.SimpleListFilter):
    """Open connections unless asked otherwise."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("closed", "Closed"), ("all", "All")]

    def choices(self, changelist):
        current = self.value() or "open"
        for value, label in self.lookup_choices:
            yield {
                "selected": current == value,
                "query_string": changelist.get_query_string({self.parameter_name: value}),
                "display": label,
            }

    def queryset(self, request, queryset):
        state = self.value() or "open"
        if state == "open":
            return queryset.filter(disconnected_at__isnull=True)
        if state == "closed":
            return queryset.filter(disconnected_at__isnull=False)
        return queryset


class OriginatorFilter(admin.SimpleListFilter):
    """The first-party originators (a fixed, short list); ``?originator=X``
    filters by any other value, and the search box finds the rest."""

    title = "originator"
    parameter_name = "originator"

    def lookups(self, request, model_admin):
        names = sorted({process_default_originator(), *first_party_originators()})
        if self.value() and self.value() not in names:
            names.append(self.value())
        return [(name, name) for name in names]

    def queryset(self, request, queryset):
        return queryset.filter(originator=self.value()) if self.value() else queryset


def admin_time(value) -> str:
    """A time with seconds and zone, or "—"."""
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z") if value else NOT_YET


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows are written by the server alone; the admin only shows them."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ConnectionIdentity)
class ConnectionIdentityAdmin(ReadOnlyAdmin):
    list_display = (
        "connection",
        "client_name",
        "client_version",
        "originator",
        "kind",
        "server_instance",
        "remote_addr",
        "connected",
        "initialized",
        "disconnected",
    )
    list_display_links = ("connection",)
    list_filter = (StateFilter, OriginatorFilter, "is_infrastructure", "is_first_party")
    search_fields = ("=originator", "client_name", "server_instance", "user_agent", "connection_id")
    # Open connections first, newest first.
    ordering = (F("disconnected_at").asc(nulls_first=True), "-connected_at")
    show_full_result_count = False
    list_per_page = 100

    @admin.display(description="connection")
    def connection(self, row: ConnectionIdentity) -> str:
        return str(row.connection_id)[:8]  # the whole id is on the row's page and in search

    @admin.display(description="kind")
    def kind(self, row: ConnectionIdentity) -> str:
        if row.initialized_at is None:
            return NOT_YET
        if row.is_infrastructure:
            return "infrastructure"
        return "first-party" if row.is_first_party else "third-party"

    @admin.display(description="connected", ordering="connected_at")
    def connected(self, row: ConnectionIdentity) -> str:
        return admin_time(row.connected_at)

    @admin.display(description="initialized", ordering="initialized_at")
    def initialized(self, row: ConnectionIdentity) -> str:
        return admin_time(row.initialized_at)

    @admin.display(description="disconnected", ordering="disconnected_at")
    def disconnected(self, row: ConnectionIdentity) -> str:
        return admin_time(row.disconnected_at) if row.disconnected_at else "open"
