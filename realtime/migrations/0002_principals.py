import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("identity", "0004_principals"),
        ("realtime", "0001_thread_store"),
    ]

    operations = [
        # Nullable until 0003 gives the existing rows to the local principal.
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
        migrations.AddIndex(
            model_name="storedthread",
            index=models.Index(fields=["principal", "-updated_at", "-id"], name="threads_of_principal"),
        ),
    ]
