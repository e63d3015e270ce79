import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


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
        # Nullable until 0005 gives the existing rows to the local principal.
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
    ]
