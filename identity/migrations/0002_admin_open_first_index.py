"""An index in the admin's default order: open connections first, newest first.

PostgreSQL sorts NULLs last unless told, and SQLite cannot say NULLS FIRST in
an index (it sorts them first anyway), so each gets its own statement.
"""

from django.db import migrations

INDEX = "identity_conn_open_first"
COLUMNS = {
    "postgresql": '"disconnected_at" ASC NULLS FIRST, "connected_at" DESC',
    "sqlite": '"disconnected_at" ASC, "connected_at" DESC',
}


def create_index(apps, schema_editor):
    columns = COLUMNS.get(schema_editor.connection.vendor)
    if columns:
        schema_editor.execute(f'CREATE INDEX "{INDEX}" ON "identity_connectionidentity" ({columns})')


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor in COLUMNS:
        schema_editor.execute(f'DROP INDEX IF EXISTS "{INDEX}"')


class Migration(migrations.Migration):
    dependencies = [("identity", "0001_initial")]
    operations = [migrations.RunPython(create_index, drop_index)]
