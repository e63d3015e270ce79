"""Threads and turns name their principal (PROTOCOL §12). Every one before
principals was the one local principal's, and is given to it here, with
its turns' usage counted toward it (``Principal.tokens_used``).

One transaction, as identity's 0004 explains; stop every server of the old
release before migrating.
"""

import django.db.models.deletion
from django.db import migrations, models
from django.db.models import Sum

LOCAL_PRINCIPAL = "local"  # identity.principals.LOCAL_PRINCIPAL, as of this migration


def give_rows_to_the_local_principal(apps, schema_editor):
    Principal = apps.get_model("identity", "Principal")
    StoredThread = apps.get_model("realtime", "StoredThread")
    StoredTurn = apps.get_model("realtime", "StoredTurn")
    if StoredThread.objects.filter(principal__isnull=True).exists():
        local, _ = Principal.objects.get_or_create(name=LOCAL_PRINCIPAL)
        StoredThread.objects.filter(principal__isnull=True).update(principal=local)
        StoredTurn.objects.filter(principal__isnull=True).update(principal=local)
        used = StoredTurn.objects.filter(principal=local).aggregate(used=Sum("total_tokens"))["used"] or 0
        Principal.objects.filter(pk=local.pk).update(tokens_used=used)
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


class Migration(migrations.Migration):
    dependencies = [
        ("identity", "0004_principals"),
        ("realtime", "0001_thread_store"),
    ]

    operations = [
        migrations.AddField(
            model_name="storedthread",
            name="principal",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="threads", to="identity.principal"
            ),
        ),
        migrations.AddField(
            model_name="storedturn",
            name="principal",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="turns", to="identity.principal"
            ),
        ),
        migrations.RunPython(give_rows_to_the_local_principal, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="storedthread",
            name="principal",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="threads", to="identity.principal"
            ),
        ),
        migrations.AlterField(
            model_name="storedturn",
            name="principal",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="turns", to="identity.principal"
            ),
        ),
        migrations.AddIndex(
            model_name="storedthread",
            index=models.Index(fields=["principal", "-updated_at", "-id"], name="threads_of_principal"),
        ),
    ]
