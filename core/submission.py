"""What a submitted job must look like, and what it gets when it says nothing (SPEC §3,
§6): checked and resolved here, before anything reaches the database.

The limits and defaults come in as `Rules`, made by the caller from its settings (the web,
the CLI and the supervisor each make theirs at start); nothing here reads the environment.
"""
import hashlib
import json
from functools import partial
from typing import NamedTuple, Optional

from jsonschema import Draft202012Validator

import handlers
from core.errors import InvalidJob, TooLarge
from core.times import parse_time

# "$(?!\n)": a JSON Schema pattern is a search, and "$" alone also matches before a final
# newline, which would let "default\n" through as a queue name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$(?!\n)"
MAX_BATCH = 1000
UNIQUE_WHILE = ("queued", "active")  # the first is the default
# An absolute http(s) URL in printable ASCII: a host (RFC 3986's authority characters),
# then any path, query and fragment without spaces.
CALLBACK_URL_PATTERN = (r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]+"
                        r"(?:[/?#][\x21-\x7e]*)?$(?!\n)")

# Made once: json.dumps with options makes a new encoder at every call.
compact_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class Rules(NamedTuple):
    """The settings a submission is checked and completed with (SPEC §9's defaults)."""
    max_payload_bytes: int = 256 * 1024
    default_max_attempts: int = 5
    default_timeout_s: float = 300.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 3600.0

    @classmethod
    def from_settings(cls, settings):
        """The rules of a process's settings (infra.config.Settings, or anything with
        attributes of the same names)."""
        return cls(**{name: getattr(settings, name) for name in cls._fields})


SUBMISSION_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "minLength": 1, "maxLength": 100},
        "payload": {"type": "object"},
        "queue": {"type": "string", "pattern": NAME_PATTERN},
        "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
        "run_at": {"type": "string", "format": "date-time", "maxLength": 64},
        "delay_s": {"type": "number", "minimum": 0, "maximum": 10 * 365 * 86400},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 7 * 86400},
        "backoff": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "base_s": {"type": "number", "minimum": 0, "maximum": 7 * 86400},
                "max_s": {"type": "number", "minimum": 0, "maximum": 30 * 86400},
            },
        },
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 255,
                            "pattern": r"^[\x20-\x7e]+$(?!\n)"},
        "group": {"type": "string", "minLength": 1, "maxLength": 200},
        # SPEC §12: one waiting (or active) job per type and key; a job not started in time
        # never starts.
        "unique_key": {"type": "string", "minLength": 1, "maxLength": 255},
        "unique_while": {"enum": list(UNIQUE_WHILE)},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 10 * 365 * 86400},
        "expires_at": {"type": "string", "format": "date-time", "maxLength": 64},
        "callback_url": {"type": "string", "maxLength": 2048, "pattern": CALLBACK_URL_PATTERN,
                         "description": "Where the job's document is POSTed, signed, once "
                                        "it ends (http or https)."},
    },
}
_submission_validator = Draft202012Validator(SUBMISSION_SCHEMA)


class NewJob(NamedTuple):
    """A validated submission with every default resolved (the job's effective values)."""
    type: str
    payload: dict
    payload_json: str  # the payload as stored (compact JSON), encoded once when checked
    queue: str
    priority: int
    run_at: Optional[float]
    delay_s: float
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    idempotency_key: Optional[str] = None
    request_hash: Optional[str] = None
    group_key: Optional[str] = None  # `group`: group_concurrency counts running jobs by it
    unique_key: Optional[str] = None
    unique_while: Optional[str] = None  # set when unique_key is
    ttl_s: Optional[float] = None  # expires ttl_s after it is stored...
    expires_at: Optional[float] = None  # ...or at this time
    parent_id: Optional[int] = None  # a follow-up's parent (ctx.enqueue)
    callback_url: Optional[str] = None  # told when the job ends (core/callbacks.py)


class JobDefaults(NamedTuple):
    """What a job of one type gets unless it says otherwise."""
    queue: str
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float


def job_defaults(handler, rules):
    """The handler's own options, else the rules' defaults."""
    return JobDefaults(
        queue=_first(handler.queue, "default"),
        max_attempts=_first(handler.max_attempts, rules.default_max_attempts),
        timeout_s=_first(handler.timeout_s, rules.default_timeout_s),
        backoff_base_s=_first(handler.backoff_base_s, rules.backoff_base_s),
        backoff_max_s=_first(handler.backoff_max_s, rules.backoff_max_s))


def request_fingerprint(body):
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_submission(body, rules, idempotency_key=None):
    """Check one submission and resolve its defaults; raise InvalidJob or TooLarge."""
    options = _options_of(body, rules, idempotency_key)
    resolved = _resolved_before(options)
    if resolved is not None:
        new = _with_payload(resolved, body.get("payload", {}), rules)
        if new is not None:
            return new
    new = _checked_in_full(body, rules, idempotency_key)
    if new.idempotency_key is None:
        _remember(options, new)
    return new


def _checked_in_full(body, rules, idempotency_key):
    if not isinstance(body, dict):
        raise InvalidJob("a job must be a JSON object", ["(job): must be an object"])
    payload = body.get("payload", {})
    unproven = [item for item in body.items() if not _proven(item)]
    try:
        # JSON Schema's "number" lets NaN through (a CLI float, a parsed 1e999 is infinity):
        # it would break the NOT NULL columns, every timeout and every JSON reader. (A value
        # proven valid before passed this check then.)
        payload_json = compact_json.encode(payload)
        rest = [value for name, value in unproven if name != "payload"]
        if rest:
            compact_json.encode(rest)
    except ValueError:
        raise InvalidJob("the job holds NaN or Infinity, which are not JSON numbers",
                         ["(job): NaN and Infinity are not allowed"]) from None
    if "type" not in body or not _fits_schema(unproven):
        errors = [f"{'/'.join(map(str, e.absolute_path)) or '(job)'}: {e.message}"
                  for e in _submission_validator.iter_errors(body)]
        if errors:
            raise InvalidJob("the job is not valid", errors)
    if "run_at" in body and "delay_s" in body:
        raise InvalidJob("give run_at or delay_s, not both", ["run_at: not allowed with delay_s"])
    if "ttl_s" in body and "expires_at" in body:
        raise InvalidJob("give ttl_s or expires_at, not both", ["ttl_s: not allowed with expires_at"])
    if "unique_while" in body and "unique_key" not in body:
        raise InvalidJob("unique_while needs a unique_key", ["unique_while: needs unique_key"])
    handler = handlers.get(body["type"])
    if handler is None:
        raise InvalidJob(f"unknown job type {body['type']!r}",
                         [f"type: {body['type']!r} is not registered"])
    size = len(payload_json)  # ASCII: json.dumps escapes everything else
    if size > rules.max_payload_bytes:
        raise TooLarge(f"the payload is {size} bytes, over the limit of {rules.max_payload_bytes}")
    payload_errors = handler.payload_errors(payload)
    if payload_errors:
        raise InvalidJob(f"the payload does not match the schema of {handler.name!r}",
                         payload_errors)
    given = job_defaults(handler, rules)
    backoff = body.get("backoff", {})
    base = _first(backoff.get("base_s"), given.backoff_base_s)
    cap = _first(backoff.get("max_s"), given.backoff_max_s)
    if cap < base:
        raise InvalidJob("backoff max_s must be at least base_s", ["backoff/max_s: below base_s"])
    key = body.get("idempotency_key", idempotency_key)
    return NewJob(
        type=handler.name,
        payload=payload,
        queue=_first(body.get("queue"), given.queue),
        priority=int(body.get("priority", 0)),
        run_at=parse_time(body["run_at"]) if "run_at" in body else None,
        delay_s=float(body.get("delay_s", 0)),
        max_attempts=int(_first(body.get("max_attempts"), given.max_attempts)),
        timeout_s=float(_first(body.get("timeout_s"), given.timeout_s)),
        backoff_base_s=float(base),
        backoff_max_s=float(cap),
        idempotency_key=key,
        request_hash=request_fingerprint(body) if key is not None else None,
        payload_json=payload_json,
        group_key=body.get("group"),
        unique_key=body.get("unique_key"),
        unique_while=body.get("unique_while", UNIQUE_WHILE[0]) if "unique_key" in body else None,
        ttl_s=float(body["ttl_s"]) if "ttl_s" in body else None,
        expires_at=parse_time(body["expires_at"], "expires_at") if "expires_at" in body else None,
        callback_url=body.get("callback_url"),
    )


# A batch repeats its options (type, queue, priority...) with another payload in each job.
# The options of a job without an idempotency key, once checked and resolved, are kept with
# the handler they were resolved by; a job with the same options (the same values of the
# same classes, in the same order) and the same rules takes them as they are, while that
# handler is still the one registered. Its payload is checked as every payload is: when any
# check refuses it, the job is checked in full, which says why.
_resolved = {}  # (rules, idempotency_key, (name, class, value)...) -> (handler, NewJob tail)
_MAX_RESOLVED = 10_000
_AFTER_PAYLOAD = NewJob._fields.index("payload_json") + 1


def _options_of(body, rules, idempotency_key):
    """The key of body's options in _resolved (None when body is not an object)."""
    if not isinstance(body, dict):
        return None
    return (rules, idempotency_key, *[(name, value.__class__, value)
                                      for name, value in body.items() if name != "payload"])


def _resolved_before(options):
    """What _resolved holds for these options; None when nothing, or when one of them
    cannot be a key (an object or a list)."""
    try:
        return _resolved.get(options)
    except TypeError:
        return None


def _remember(options, new):
    """Keep what new's options resolved to (not when one of them is an object or a list)."""
    if len(_resolved) >= _MAX_RESOLVED:
        _resolved.clear()
    try:
        _resolved[options] = (handlers.get(new.type), new[_AFTER_PAYLOAD:])
    except TypeError:
        pass


def _with_payload(resolved, payload, rules):
    """The job of options resolved before with this payload; None when the payload does not
    pass (or the handler changed)."""
    handler, tail = resolved
    if handlers.get(handler.name) is not handler or not isinstance(payload, dict):
        return None
    try:
        payload_json = compact_json.encode(payload)
    except ValueError:
        return None
    if len(payload_json) > rules.max_payload_bytes or handler.payload_errors(payload):
        return None
    return NewJob._make((handler.name, payload, payload_json, *tail))


# SUBMISSION_SCHEMA checks each property on its own, so a submission fits it when it has a
# type and each of its properties fits; a value found valid once (hashable: not an object or
# a list) need not be checked again, and a batch repeats its types and queues.

def _property_check(schema):
    """is_valid for one property of SUBMISSION_SCHEMA: jsonschema's own type check where
    the schema names only a type, else its validator."""
    if schema.keys() == {"type"}:
        return partial(Draft202012Validator.TYPE_CHECKER.is_type, type=schema["type"])
    return Draft202012Validator(schema).is_valid


_property_checks = {name: _property_check(schema)
                    for name, schema in SUBMISSION_SCHEMA["properties"].items()}
_valid_values = {}  # (property, class, value) found valid; a batch repeats most of them
_MAX_VALID_VALUES = 10_000
_UNREMEMBERED = (dict, list)  # a payload, a backoff: not hashable, checked every time


def _proven(item):
    """Whether this (property, value) was found valid before."""
    name, value = item
    kind = value.__class__  # True == 1 and 1.0 == 1, but they are not equally valid
    if kind in _UNREMEMBERED:
        return False
    try:
        return (name, kind, value) in _valid_values
    except TypeError:  # not from JSON (a tuple holding a list, say): invalid, said later
        return False


def _fits_schema(unproven):
    """Whether these (property, value) all fit SUBMISSION_SCHEMA, as its validator says."""
    for name, value in unproven:
        check = _property_checks.get(name)
        if check is None or not check(value):
            return False  # additionalProperties, or an invalid value
        if value.__class__ in _UNREMEMBERED:
            continue
        if len(_valid_values) >= _MAX_VALID_VALUES:
            forget_valid_values()
        _valid_values[(name, value.__class__, value)] = True
    return True


def forget_valid_values():
    """Forget the values found valid and the options resolved before: the next submissions
    are checked in full (each cache empties itself when full; a test starts from them
    empty)."""
    _valid_values.clear()
    _resolved.clear()


def _first(*values):
    for value in values:
        if value is not None:
            return value
