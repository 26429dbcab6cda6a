"""Persistence: settings, SQLAlchemy models, repository functions and Alembic migrations."""
