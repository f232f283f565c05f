"""Configuration: read from the environment once, validated, into one typed object.

A bad value raises ConfigError naming the variable; entry points turn it into one line
on stderr and a non-zero exit (see `fail_fast`).
"""
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from ipaddress import ip_network
from urllib.parse import urlparse

import psycopg2.extensions
from limits import parse_many
from limits.errors import ConfigurationError
from limits.storage import storage_from_string


class ConfigError(Exception):
    """A setting (or the database it names) is unusable; the process must not start."""


def fail_fast(error):
    """Stop the process with one clear line: the contract for bad configuration."""
    print(f"conveyor: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _number(env, name, default, *, integer=False, minimum=0.0, above=False):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum or (above and value == minimum):
        bound = "above" if above else "at least"
        raise ConfigError(f"{name} must be {bound} {minimum:g}, got {raw!r}")
    return value


def _choice(env, name, default, choices):
    value = env.get(name, default).strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _rate_limit(env, name, default):
    value = env.get(name, default).strip() or default
    try:
        parse_many(value)
    except ValueError:
        raise ConfigError(f"{name} is not a rate limit like '100/second', got {value!r}") from None
    return value


def _ratelimit_storage(env):
    """RATELIMIT_STORAGE_URI, else REDIS_URL (the platform convention), else memory://."""
    for name in ("RATELIMIT_STORAGE_URI", "REDIS_URL"):
        uri = env.get(name, "").strip()
        if uri:
            try:
                storage_from_string(uri)  # builds a client only: nothing is contacted
            except (ConfigurationError, ValueError) as exc:
                raise ConfigError(f"{name} {uri!r} is not usable: {exc}") from None
            return uri
    return "memory://"


def _trusted_proxies(env):
    """The networks whose X-Forwarded-For is believed (app.client_address)."""
    networks = []
    for item in filter(None, (part.strip() for part in env.get("TRUSTED_PROXIES", "").split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"TRUSTED_PROXIES must be comma-separated addresses or CIDRs, "
                              f"got {item!r}") from None
    return tuple(networks)


KEY_VALUE = re.compile(r"^\w+\s*=")  # libpq's `host=... dbname=...`


def _database_url(env):
    """A SQLite or PostgreSQL URL (see _postgres_url)."""
    url = env.get("DATABASE_URL", "").strip() or "sqlite:///conveyor.db"
    if urlparse(url).scheme == "sqlite":
        return url
    return _postgres_url(url, "DATABASE_URL", "sqlite:// or postgresql://")


def _postgres_url(url, name, schemes):
    """A PostgreSQL URL, or what libpq alone reads: a URL of several hosts
    (`postgresql://a:5432,b:5432/db?target_session_attrs=read-write`) or the key=value
    form (`host=a,b port=5432 dbname=db`), checked by libpq's own parser."""
    parts = urlparse(url)
    if parts.scheme in ("postgres", "postgresql") and "," not in parts.netloc:
        return url
    if parts.scheme not in ("postgres", "postgresql") and not KEY_VALUE.match(url):
        raise ConfigError(f"{name} must start with {schemes} (or be "
                          f"libpq's key=value form), got {url!r}")
    try:
        dbname = psycopg2.extensions.parse_dsn(url).get("dbname")
    except psycopg2.ProgrammingError as exc:
        reason = (str(exc).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{name} is not a connection string libpq reads: {reason}") \
            from None
    if not dbname:
        raise ConfigError(f"{name} names no database (postgresql://host,host/DBNAME, "
                          "or dbname=DBNAME)")
    return url


def _listen_database_url(env, database_url):
    """LISTEN_DATABASE_URL: where the supervisor LISTENs for new jobs, by default
    DATABASE_URL; the database itself when DATABASE_URL is a transaction pooler."""
    url = env.get("LISTEN_DATABASE_URL", "").strip()
    if not url:
        return database_url
    if database_url.startswith("sqlite"):
        raise ConfigError("LISTEN_DATABASE_URL is for a PostgreSQL DATABASE_URL, "
                          f"but DATABASE_URL is {database_url!r}")
    return _postgres_url(url, "LISTEN_DATABASE_URL", "postgresql://")


def _queues(env):
    raw = env.get("WORKER_QUEUES", "").strip()
    return tuple(q.strip() for q in raw.split(",") if q.strip())


# A DNS name whose last label is not all digits, so a mistyped address is not taken for one.
HOST_NAME = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                       r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _outbound_allow(env):
    """OUTBOUND_ALLOW: addresses and networks (ip_network) and host names (str) to trust."""
    entries = []
    for raw in env.get("OUTBOUND_ALLOW", "").split(","):
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            entries.append(ip_network(entry))
        except ValueError:
            if not HOST_NAME.fullmatch(entry):
                raise ConfigError(
                    f"OUTBOUND_ALLOW must list addresses, networks like 10.0.0.0/8 or host "
                    f"names, got {raw.strip()!r}") from None
            entries.append(entry)
    return tuple(entries)


def _bool(env, name):
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///conveyor.db"
    listen_database_url: str = "sqlite:///conveyor.db"
    database_pool_mode: str = "session"
    port: int = 5000
    rate_limit: str = "100/second"
    ratelimit_storage_uri: str = "memory://"
    rate_limit_on_storage_error: str = "closed"
    auth_fail_limit: str = "30/minute"
    trusted_proxies: tuple = ()
    max_payload_bytes: int = 256 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    worker_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_queues: tuple = ()
    heartbeat_s: float = 5.0
    lease_s: float = 30.0
    shutdown_grace_s: float = 25.0
    poll_interval_s: float = 0.5
    worker_batch: int = 50
    worker_max_jobs: int = 0
    worker_max_memory_mb: float = 0.0
    default_max_attempts: int = 5
    default_timeout_s: float = 300.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 3600.0
    callback_backoff_base_s: float = 10.0
    callback_backoff_max_s: float = 3600.0
    callback_timeout_s: float = 10.0
    handler_paths: tuple = ()
    retention_days: float = 14.0
    log_format: str = "text"
    log_level: str = "info"
    metrics_public: bool = False
    outbound_allow: tuple = ()

    @property
    def is_postgres(self):
        return not self.database_url.startswith("sqlite")

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        database_url = _database_url(env)
        settings = cls(
            database_url=database_url,
            listen_database_url=_listen_database_url(env, database_url),
            database_pool_mode=_choice(env, "DATABASE_POOL_MODE", "session",
                                       ("session", "transaction")),
            port=_number(env, "PORT", 5000, integer=True, minimum=1),
            rate_limit=_rate_limit(env, "RATE_LIMIT", "100/second"),
            ratelimit_storage_uri=_ratelimit_storage(env),
            rate_limit_on_storage_error=_choice(env, "RATE_LIMIT_ON_STORAGE_ERROR", "closed",
                                                ("open", "closed")),
            auth_fail_limit=_rate_limit(env, "AUTH_FAIL_LIMIT", "30/minute"),
            trusted_proxies=_trusted_proxies(env),
            max_payload_bytes=_number(env, "MAX_PAYLOAD_BYTES", 256 * 1024, integer=True, minimum=1),
            max_request_bytes=_number(env, "MAX_REQUEST_BYTES", 16 * 1024 * 1024, integer=True, minimum=1),
            worker_concurrency=_number(env, "WORKER_CONCURRENCY", os.cpu_count() or 1, integer=True, minimum=1),
            worker_queues=_queues(env),
            heartbeat_s=_number(env, "HEARTBEAT_S", 5.0, above=True),
            lease_s=_number(env, "LEASE_S", 30.0, above=True),
            shutdown_grace_s=_number(env, "SHUTDOWN_GRACE_S", 25.0),
            poll_interval_s=_number(env, "POLL_INTERVAL_S", 0.5, above=True),
            worker_batch=_number(env, "WORKER_BATCH", 50, integer=True, minimum=1),
            worker_max_jobs=_number(env, "WORKER_MAX_JOBS", 0, integer=True),
            worker_max_memory_mb=_number(env, "WORKER_MAX_MEMORY_MB", 0.0),
            default_max_attempts=_number(env, "DEFAULT_MAX_ATTEMPTS", 5, integer=True, minimum=1),
            default_timeout_s=_number(env, "DEFAULT_TIMEOUT_S", 300.0, above=True),
            backoff_base_s=_number(env, "BACKOFF_BASE_S", 1.0),
            backoff_max_s=_number(env, "BACKOFF_MAX_S", 3600.0),
            callback_backoff_base_s=_number(env, "CALLBACK_BACKOFF_BASE_S", 10.0),
            callback_backoff_max_s=_number(env, "CALLBACK_BACKOFF_MAX_S", 3600.0),
            callback_timeout_s=_number(env, "CALLBACK_TIMEOUT_S", 10.0, above=True),
            handler_paths=tuple(p for p in env.get("HANDLER_PATHS", "").split(":") if p.strip()),
            retention_days=_number(env, "RETENTION_DAYS", 14.0),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            metrics_public=_bool(env, "METRICS_PUBLIC"),
            outbound_allow=_outbound_allow(env),
        )
        if settings.lease_s <= 2 * settings.heartbeat_s:
            raise ConfigError(
                f"LEASE_S must be above 2 x HEARTBEAT_S ({2 * settings.heartbeat_s:g}), "
                f"got {settings.lease_s:g}")
        if settings.backoff_max_s < settings.backoff_base_s:
            raise ConfigError("BACKOFF_MAX_S must be at least BACKOFF_BASE_S")
        if settings.callback_backoff_max_s < settings.callback_backoff_base_s:
            raise ConfigError("CALLBACK_BACKOFF_MAX_S must be at least CALLBACK_BACKOFF_BASE_S")
        for path in settings.handler_paths:
            if not os.path.isdir(path):
                raise ConfigError(f"HANDLER_PATHS names {path!r}, which is not a directory")
        return settings


_current = None


def settings():
    """The process's settings, read on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def reset(new=None):
    """Replace the process's settings (tests and entry points that read them early)."""
    global _current
    _current = new
