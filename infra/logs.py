"""Logging set-up for every process: one line per event, as text or JSON (LOG_FORMAT)."""
import json
import logging
import sys
import time

CONTEXT_FIELDS = ("event", "job_id", "type", "queue", "attempt", "worker_id", "delay_s",
                  "status")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")

    def format(self, record):
        line = super().format(record)
        tags = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS
                        if hasattr(record, name))
        return f"{line} {tags}" if tags else line


def configure(settings):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("peewee").setLevel(logging.WARNING)
