"""Where the core's SQL that differs by database lives: one module and one file of named
statements per database (postgres.py with postgres.sql, sqlite.py with sqlite.sql), two
implementations of the same functions. `backend()` is the one of the open database.

Statements that read the same on both databases are peewee queries in the core module that
owns them; every statement that claims a job or moves a running one is here.
"""
from models import is_postgres
from core.store import postgres, sqlite


def backend():
    """The store of the open database: core.store.postgres or core.store.sqlite."""
    return postgres if is_postgres() else sqlite
