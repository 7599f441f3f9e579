"""Alembic migrations of a collection's database (installed as ``retrieval_imprint.migrations``)."""
