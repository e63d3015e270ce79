"""Read-only admin for ConnectionIdentity: operators inspect, never edit."""

from django.contrib import admin
from django.db.models import F

from .models import ConnectionIdentity


class OpenClosedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("closed", "Closed")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(disconnected_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(disconnected_at__isnull=False)
        return queryset


@admin.register(ConnectionIdentity)
class ConnectionIdentityAdmin(admin.ModelAdmin):
    list_display = (
        "connection_id",
        "client_name",
        "client_version",
        "originator",
        "is_infrastructure",
        "is_first_party",
        "server_instance",
        "remote_addr",
        "connected_at",
        "initialized_at",
        "disconnected_at",
    )
    list_filter = (
        OpenClosedFilter,
        "originator",
        "is_infrastructure",
        "is_first_party",
        "server_instance",
    )
    search_fields = ("client_name", "user_agent", "connection_id")
    # Open connections first, newest first.
    ordering = (F("disconnected_at").asc(nulls_first=True), "-connected_at")
    show_full_result_count = False
    list_per_page = 100

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
