"""API keys: random, shown once, stored only as a SHA-256, checked in constant time,
revoked by name. The routes and the `flask keys` commands both go through here.

A key has 256 bits of randomness, so a fast hash is enough: nothing can be guessed from
the stored digests, and a lookup by digest costs one indexed query.
"""
import hashlib
import hmac
import re
import secrets

import peewee as pw
from limits import parse_many

from core.errors import Conflict, InvalidKey, NotFound
import models
from models import ApiKey, db, loaded, now

ROLES = ("submit", "admin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$")
KEY_PREFIX = "cvy_"  # makes a leaked key easy to recognise (and to scan for)
MAX_KEY_LENGTH = 256


def digest(secret):
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def check_rate_limit(text):
    """A per-key rate limit like '10/second' or '100/minute;1000/hour', or InvalidKey."""
    try:
        if text.strip():
            parse_many(text)
            return text.strip()
    except ValueError:
        pass
    raise InvalidKey(f"{text!r} is not a rate limit like '10/second' or '100/minute;1000/hour'")


def create(name, role="submit", rate_limit=None):
    """Store a new key; return (row, secret). The secret is not kept anywhere else."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidKey(f"key name {name!r} must match {NAME_PATTERN.pattern}")
    if role not in ROLES:
        raise InvalidKey(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if rate_limit is not None:
        rate_limit = check_rate_limit(rate_limit)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with db.atomic():
            [row] = (ApiKey.insert(name=name, key_hash=digest(secret), role=role,
                                   rate_limit=rate_limit, created_at=now(),
                                   callback_secret=secrets.token_hex(32))
                     .returning(ApiKey).execute())
    except pw.IntegrityError:
        raise Conflict(f"there is already an active key named {name!r}; revoke it first "
                       f"or choose another name") from None
    return row, secret


_KEY_COLUMNS = ApiKey._meta.sorted_field_names  # each named as its column


def verify(secret):
    """The active key whose secret this is, or None (unknown, revoked or malformed)."""
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_KEY_LENGTH:
        return None
    presented = digest(secret)
    # Looked up on every request, so in plain SQL; never cached, so a revocation holds at once.
    row = models.execute(f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys "
                         f"WHERE key_hash = {db.param} AND revoked_at IS NULL",
                         (presented,)).fetchone()
    if row is None:
        return None
    key = loaded(ApiKey, dict(zip(_KEY_COLUMNS, row)))
    return key if hmac.compare_digest(key.key_hash, presented) else None


def revoke(name):
    """Revoke the active key named `name` at once; return it, or raise NotFound."""
    with db.atomic():
        revoked = list(ApiKey.update(revoked_at=now())
                       .where(ApiKey.name == name, ApiKey.revoked_at.is_null())
                       .returning(ApiKey).execute())
    if not revoked:
        raise NotFound(f"there is no active key named {name!r}")
    return revoked[0]


def all_keys():
    """Every key, active and revoked, oldest first."""
    return list(ApiKey.select().order_by(ApiKey.id))
