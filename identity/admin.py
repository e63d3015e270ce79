"""Read-only admin for connections and principals: operators inspect, never
edit, except that they issue and revoke tokens (PROTOCOL §12).

The connection list answers "who is connected now" at a glance: open
connections are the default view, one row fits a 1920 px screen, times carry
seconds and zone, and a connection that has not initialized shows "—", not
"no". Filters list only bounded sets (the first-party originators, never
every name a client ever chose); anything else is a search. The principal
list answers "who used how much": usage per principal, and on a principal's
page its tokens and its usage per originator.
"""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .models import AccessToken, ConnectionIdentity, Principal
from .policy import first_party_originators, process_default_originator
from .principals import TokenError, issue_token, revoke

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
    """The first-party originators (a fixed, short list) that have rows;
    ``?originator=X`` filters by any other value, and the search box finds
    the rest."""

    title = "originator"
    parameter_name = "originator"

    def lookups(self, request, model_admin):
        known = sorted({process_default_originator(), *first_party_originators()})
        # An indexed probe (LIMIT 1) per name: a DISTINCT over them would read every row they have.
        rows = model_admin.get_queryset(request).order_by()
        names = [name for name in known if rows.filter(originator=name).exists()]
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
        "principal",
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
    search_fields = ("=originator", "=principal__name", "client_name", "server_instance", "user_agent", "connection_id")
    list_select_related = ("principal",)
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


# --- principals and tokens ----------------------------------------------------

USAGE_COLUMNS = (
    "turns",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
    "total_tokens",
)


def _turns_of_principal():
    from realtime.models import StoredTurn  # the admin is the one place identity reads realtime's rows

    return StoredTurn.objects.filter(principal=OuterRef("pk")).order_by().values("principal")


def _usage_sum(column: str) -> Coalesce:
    summed = _turns_of_principal().annotate(value=Sum(column) if column != "turns" else Count("id")).values("value")
    return Coalesce(Subquery(summed), 0)


class AccessTokenInline(admin.TabularInline):
    model = AccessToken
    fields = ("name", "prefix_shown", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-created_at",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="prefix")
    def prefix_shown(self, row: AccessToken) -> str:
        return f"{row.prefix}…"


class IssueTokenForm(forms.Form):
    principal = forms.CharField(max_length=150, help_text="created if new")
    name = forms.CharField(max_length=150, required=False, help_text="to revoke it by; default: its prefix")


@admin.register(Principal)
class PrincipalAdmin(ReadOnlyAdmin):
    list_display = (
        "name", "active_tokens", "open_connections", "turns", "input_tokens", "output_tokens", "total_tokens",
        "budget", "created",
    )  # fmt: skip
    search_fields = ("=name",)
    ordering = ("name",)
    fields = ("name", "created_at", "token_budget", "workspace_roots", "usage_by_originator")
    readonly_fields = fields
    inlines = (AccessTokenInline,)
    show_full_result_count = False
    list_per_page = 100
    change_list_template = "admin/identity/principal/change_list.html"

    def get_queryset(self, request):
        tokens = AccessToken.objects.filter(principal=OuterRef("pk"), revoked_at__isnull=True).order_by()
        connections = ConnectionIdentity.objects.filter(principal=OuterRef("pk"), disconnected_at__isnull=True)
        return (
            super()
            .get_queryset(request)
            .annotate(
                active_token_count=Coalesce(
                    Subquery(tokens.values("principal").annotate(n=Count("id")).values("n")), 0
                ),
                open_connection_count=Coalesce(
                    Subquery(connections.order_by().values("principal").annotate(n=Count("id")).values("n")), 0
                ),
                **{f"used_{column}": _usage_sum(column) for column in USAGE_COLUMNS},
            )
        )

    def get_urls(self):
        issue = path(
            "issue-token/", self.admin_site.admin_view(self.issue_token_view), name="identity_principal_issue_token"
        )
        return [issue, *super().get_urls()]

    def issue_token_view(self, request):
        """Issue a token and show it once; nothing keeps it."""
        if not request.user.has_perm("identity.add_accesstoken"):
            raise PermissionDenied
        form = IssueTokenForm(request.POST or None, initial={"principal": request.GET.get("principal", "")})
        issued = None
        if request.method == "POST" and form.is_valid():
            try:
                row, token = issue_token(form.cleaned_data["principal"], form.cleaned_data["name"] or None)
            except TokenError as exc:
                form.add_error(None, str(exc))
            else:
                issued = {"row": row, "token": token}
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Issue a token",
            "form": form,
            "issued": issued,
        }
        response = TemplateResponse(request, "admin/identity/principal/issue_token.html", context)
        response["Cache-Control"] = "no-store"  # the token must not stay in any cache
        return response

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_issue": request.user.has_perm("identity.add_accesstoken")}
        return super().changelist_view(request, extra_context)

    @admin.display(description="active tokens", ordering="active_token_count")
    def active_tokens(self, row: Principal) -> int:
        return row.active_token_count

    @admin.display(description="open connections", ordering="open_connection_count")
    def open_connections(self, row: Principal) -> int:
        return row.open_connection_count

    @admin.display(description="turns", ordering="used_turns")
    def turns(self, row: Principal) -> int:
        return row.used_turns

    @admin.display(description="input tokens", ordering="used_input_tokens")
    def input_tokens(self, row: Principal) -> int:
        return row.used_input_tokens

    @admin.display(description="output tokens", ordering="used_output_tokens")
    def output_tokens(self, row: Principal) -> int:
        return row.used_output_tokens

    @admin.display(description="total tokens", ordering="used_total_tokens")
    def total_tokens(self, row: Principal) -> int:
        return row.used_total_tokens

    @admin.display(description="budget", ordering="token_budget")
    def budget(self, row: Principal) -> str:
        """Tokens its turns used (ephemeral ones too) of its budget."""
        return "none" if row.token_budget is None else f"{row.tokens_used:,} of {row.token_budget:,}"

    @admin.display(description="created", ordering="created_at")
    def created(self, row: Principal) -> str:
        return admin_time(row.created_at)

    @admin.display(description="usage per originator")
    def usage_by_originator(self, row: Principal) -> str:
        from realtime.models import StoredTurn

        usage = (
            StoredTurn.objects.filter(principal=row)
            .values("originator")
            .annotate(turns=Count("id"), total=Sum("total_tokens"))
            .order_by("-total", "originator")[:50]
        )
        if not usage:
            return NOT_YET
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", ((u["originator"], u["turns"], u["total"]) for u in usage)
        )
        return format_html(
            '<table id="principal-usage-by-originator"><tr><th>originator</th><th>turns</th><th>total tokens</th></tr>{}</table>',
            rows,
        )


class TokenStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(AccessToken)
class AccessTokenAdmin(ReadOnlyAdmin):
    list_display = ("token", "principal", "name", "created", "last_used", "revoked")
    list_display_links = ("token",)
    list_filter = (TokenStateFilter,)
    search_fields = ("=principal__name", "name", "prefix")
    list_select_related = ("principal",)
    ordering = ("principal__name", "-created_at")
    exclude = ("digest",)
    actions = ("revoke_tokens",)

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("identity.change_accesstoken")

    @admin.action(
        description="Revoke the selected tokens (their connections close within seconds)", permissions=["revoke"]
    )
    def revoke_tokens(self, request, queryset):
        revoked = revoke(queryset)
        self.message_user(
            request, f"Revoked {revoked} token(s); their live connections close within seconds.", messages.SUCCESS
        )

    @admin.display(description="token")
    def token(self, row: AccessToken) -> str:
        return f"{row.prefix}…"

    @admin.display(description="created", ordering="created_at")
    def created(self, row: AccessToken) -> str:
        return admin_time(row.created_at)

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, row: AccessToken) -> str:
        return admin_time(row.last_used_at)

    @admin.display(description="revoked", ordering="revoked_at")
    def revoked(self, row: AccessToken) -> str:
        return admin_time(row.revoked_at) if row.revoked_at else "active"
