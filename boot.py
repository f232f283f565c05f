"""Process start-up shared by `web`, `worker` and the `flask` commands.

Reads and checks the settings, points the models at the database and checks it answers,
brings the schema up to date and loads the handlers. Any problem is a ConfigError or
HandlerError with one line that names its cause.
"""
import config
import handlers
import logs
import models


def start(*, upgrade=True, check_database=True, custom_plans=False):
    settings = config.settings()
    logs.configure(settings)
    models.open_database(settings.database_url, lease_s=settings.lease_s,
                         custom_plans=custom_plans)
    if check_database:
        models.check_connection()
    if upgrade:
        models.upgrade()
    handlers.load(settings.handler_paths)
    models.reset_connection()
    return settings
