"""Alembic environment: runs on the connection that ``retrieval_imprint.store`` hands over, or on
``sqlalchemy.url`` when the ``alembic`` command is used by hand (``alembic -c migrations/alembic.ini``)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from retrieval_imprint.schema import metadata


def run_migrations(connection) -> None:
    # SQLite can't ALTER most things in place: batch mode rebuilds tables (Alembic's render_as_batch)
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them on a database")

connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = engine_from_config(
        context.config.get_section(context.config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as conn:
        run_migrations(conn)
