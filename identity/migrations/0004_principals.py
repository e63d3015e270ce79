"""Principals and their tokens (PROTOCOL §12). Every connection row before
them was the one local principal's, and is given to it here.

One transaction: on PostgreSQL the rows' foreign-key checks are deferred to
the commit, and a column with checks pending cannot be altered, so they are
run at once (SET CONSTRAINTS ALL IMMEDIATE) before the column becomes NOT
NULL. Stop every server of the old release before migrating: its processes
write rows without a principal, which the new column refuses.
"""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

LOCAL_PRINCIPAL = "local"  # identity.principals.LOCAL_PRINCIPAL, as of this migration
# 0002's index, which SQLite loses when the column change below rebuilds the table.
OPEN_FIRST_INDEX = (
    'CREATE INDEX IF NOT EXISTS "identity_conn_open_first" '
    'ON "identity_connectionidentity" ("disconnected_at" ASC, "connected_at" DESC)'
)


def give_rows_to_the_local_principal(apps, schema_editor):
    Principal = apps.get_model("identity", "Principal")
    ConnectionIdentity = apps.get_model("identity", "ConnectionIdentity")
    if ConnectionIdentity.objects.filter(principal__isnull=True).exists():
        local, _ = Principal.objects.get_or_create(name=LOCAL_PRINCIPAL)
        ConnectionIdentity.objects.filter(principal__isnull=True).update(principal=local)
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def restore_the_open_first_index(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(OPEN_FIRST_INDEX)


class Migration(migrations.Migration):
    dependencies = [("identity", "0003_server_boot")]

    operations = [
        migrations.CreateModel(
            name="Principal",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=150, unique=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("workspace_roots", models.JSONField(blank=True, default=list)),
                ("token_budget", models.PositiveBigIntegerField(blank=True, null=True)),
                ("tokens_used", models.PositiveBigIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name="AccessToken",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=150)),
                ("prefix", models.CharField(max_length=16)),
                ("digest", models.CharField(editable=False, max_length=64, unique=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("last_used_at", models.DateTimeField(blank=True, null=True)),
                ("revoked_at", models.DateTimeField(blank=True, null=True)),
                (
                    "principal",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="tokens", to="identity.principal"
                    ),
                ),
            ],
            options={
                "verbose_name": "token",
                "constraints": [
                    models.UniqueConstraint(fields=("principal", "name"), name="one_token_name_per_principal")
                ],
            },
        ),
        migrations.AddField(
            model_name="connectionidentity",
            name="principal",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="connections",
                to="identity.principal",
            ),
        ),
        migrations.RunPython(give_rows_to_the_local_principal, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="connectionidentity",
            name="principal",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="connections", to="identity.principal"
            ),
        ),
        migrations.RunPython(restore_the_open_first_index, migrations.RunPython.noop),
    ]
