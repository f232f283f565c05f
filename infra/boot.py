"""Process start-up shared by `web`, `worker` and the `flask` commands.

Two steps. `prepare` reads and checks the settings, points the models at the database
(connecting to nothing) and imports the handlers: no I/O beyond importing code, so the app
calls it as it is built and importing `app` opens no connection and configures nothing.
`connect` is the explicit start-up call of a process about to work: it configures logging
and checks that the database answers (`start` does both steps). Any problem is a
ConfigError or HandlerError with one line that names its cause.

Who connects: web in gunicorn.conf.py's `on_starting` (its app prepared as gunicorn
loaded it), the worker as it starts, the `flask` commands before they run; each then calls
`ready`, which checks that the schema is up to date and says what the process uses. Only
`flask db upgrade` migrates: the Procfile's release phase, once per deploy, before the new
web and worker start (docs/scaling.md#release-phase).
"""
import logging

from infra import config
import handlers
from infra import logs
import models

log = logging.getLogger("conveyor.boot")


def prepare(*, custom_plans=False):
    """The settings, the models pointed at their database and the handlers imported,
    without connecting; returns the settings."""
    settings = config.settings()
    models.open_database(settings.database_url, lease_s=settings.lease_s,
                         custom_plans=custom_plans, pool_mode=settings.database_pool_mode)
    handlers.load(settings.handler_paths)
    return settings


def connect(settings):
    """The explicit start-up of a prepared process about to work: configure logging and
    check that the database answers (a ConfigError with one line if not). The connection
    is closed again: a process may fork after this."""
    logs.configure(settings)
    try:
        models.check_connection()
    except models.DatabaseUnavailable as exc:  # models imports no config: say it here
        raise config.ConfigError(str(exc)) from None
    models.reset_connection()


def start(*, upgrade=True, custom_plans=False):
    """prepare() and connect(), bringing the schema up to date when upgrade (the tests and
    benchmarks, which set up their own databases); returns the settings."""
    settings = prepare(custom_plans=custom_plans)
    connect(settings)
    if upgrade:
        models.upgrade()
    return settings


def ready(process, level=logging.INFO):
    """Check that every migration is applied (a ConfigError naming `flask db upgrade` if
    not: the process stops rather than run on a schema it does not know) and log one line
    of what this process uses: which database, at which schema version, with which job
    types."""
    try:
        version = models.check_schema()
    except models.SchemaBehind as exc:
        raise config.ConfigError(str(exc)) from None
    log.log(level, "%s uses %s (schema version %d) with job types: %s", process,
            models.describe(), version, ", ".join(sorted(handlers.registered())) or "none")
