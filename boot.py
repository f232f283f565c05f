"""Process start-up shared by `web`, `worker` and the `flask` commands.

Reads and checks the settings, points the models at the database and checks it answers,
brings the schema up to date and loads the handlers. Any problem is a ConfigError or
HandlerError with one line that names its cause.

Importing the app migrates nothing: web migrates in gunicorn.conf.py's `on_starting`,
the worker as it starts, the `flask` commands before they run (`flask db upgrade` itself
reports what it applied); each calls `ready`, which also says what the process uses.
"""
import logging

import config
import handlers
import logs
import models

log = logging.getLogger("conveyor.boot")


def start(*, upgrade=True, check_database=True, custom_plans=False):
    settings = config.settings()
    logs.configure(settings)
    models.open_database(settings.database_url, lease_s=settings.lease_s,
                         custom_plans=custom_plans)
    if check_database:
        try:
            models.check_connection()
        except models.DatabaseUnavailable as exc:  # models imports no config: say it here
            raise config.ConfigError(str(exc)) from None
    if upgrade:
        models.upgrade()
    handlers.load(settings.handler_paths)
    models.reset_connection()
    return settings


def ready(process, level=logging.INFO):
    """Bring the schema up to date and log one line of what this process uses: which
    database, at which schema version, with which job types. Returns models.Schema."""
    schema = models.upgrade()
    applied = f", applied {', '.join(schema.applied)}" if schema.applied else ""
    log.log(level, "%s uses %s (schema version %d%s) with job types: %s", process,
            models.describe(), schema.version, applied,
            ", ".join(sorted(handlers.registered())) or "none")
    return schema
