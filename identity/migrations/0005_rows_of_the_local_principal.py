import django.db.models.deletion
from django.db import migrations, models

LOCAL_PRINCIPAL = "local"  # identity.principals.LOCAL_PRINCIPAL, as of this migration
# 0002's index, which SQLite loses when the column change below rebuilds the table.
OPEN_FIRST_INDEX = (
    'CREATE INDEX IF NOT EXISTS "identity_conn_open_first" '
    'ON "identity_connectionidentity" ("disconnected_at" ASC, "connected_at" DESC)'
)


def give_rows_to_the_local_principal(apps, schema_editor):
    """Every connection before principals was the one local principal's."""
    Principal = apps.get_model("identity", "Principal")
    ConnectionIdentity = apps.get_model("identity", "ConnectionIdentity")
    if ConnectionIdentity.objects.filter(principal__isnull=True).exists():
        local, _ = Principal.objects.get_or_create(name=LOCAL_PRINCIPAL)
        ConnectionIdentity.objects.filter(principal__isnull=True).update(principal=local)


def restore_the_open_first_index(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(OPEN_FIRST_INDEX)


class Migration(migrations.Migration):
    # Not one transaction: PostgreSQL refuses to alter a column while the
    # update's deferred foreign-key checks are pending in the same one.
    atomic = False

    dependencies = [("identity", "0004_principals")]

    operations = [
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
