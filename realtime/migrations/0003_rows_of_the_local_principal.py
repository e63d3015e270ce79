import django.db.models.deletion
from django.db import migrations, models

LOCAL_PRINCIPAL = "local"  # identity.principals.LOCAL_PRINCIPAL, as of this migration


def give_rows_to_the_local_principal(apps, schema_editor):
    """Every thread before principals was the one local principal's: its
    connections keep seeing them."""
    Principal = apps.get_model("identity", "Principal")
    StoredThread = apps.get_model("realtime", "StoredThread")
    StoredTurn = apps.get_model("realtime", "StoredTurn")
    if StoredThread.objects.filter(principal__isnull=True).exists():
        local, _ = Principal.objects.get_or_create(name=LOCAL_PRINCIPAL)
        StoredThread.objects.filter(principal__isnull=True).update(principal=local)
        StoredTurn.objects.filter(principal__isnull=True).update(principal=local)


class Migration(migrations.Migration):
    # Not one transaction: PostgreSQL refuses to alter a column while the
    # update's deferred foreign-key checks are pending in the same one.
    atomic = False

    dependencies = [("realtime", "0002_principals"), ("identity", "0005_rows_of_the_local_principal")]

    operations = [
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
    ]
