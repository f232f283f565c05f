"""Named statements, read from a file of SQL: each statement under a line `-- name: NAME`,
its comment lines after that (what it does, and why) kept in the file, not sent."""
import json
import os
import re
from collections import namedtuple
from functools import lru_cache

import orjson

# Made once: json.dumps with options makes a new encoder at every call.
compact_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load(filename):
    """{name: statement} from a .sql file beside this module."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)) as file:
        text = file.read()
    parts = _NAME.split(text)[1:]  # [name, body, name, body, ...]
    statements = {}
    for name, body in zip(parts[::2], parts[1::2]):
        if name in statements:
            raise ValueError(f"{filename} names {name!r} twice")
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        statements[name] = "\n".join(lines).strip().rstrip(";")
    return statements


def new_jobs_json(new_jobs):
    """New jobs (core.submission.NewJob) as the insert_jobs statements read them: one JSON
    array of arrays, in this order (PostgreSQL reads arrays much faster than objects). The
    payload comes last: reading an element of SQLite's json parses the array up to it, so
    every other field would parse the payload again. The options of SPEC §12, which most
    jobs do without, are one element, null when none is given.

    Written by orjson, several times faster; by compact_json when orjson cannot write a
    value as it is (a lone surrogate). Their numbers and strings read back the same, and a
    NewJob holds no NaN or infinity (core.submission refuses them)."""
    jobs = [
        (new.type, new.queue, new.priority, new.run_at, new.delay_s, new.max_attempts,
         new.timeout_s, new.backoff_base_s, new.backoff_max_s, new.idempotency_key,
         new.request_hash, new.group_key, _options(new), new.payload_json) for new in new_jobs]
    try:
        return orjson.dumps(jobs).decode()
    except orjson.JSONEncodeError:
        return compact_json.encode(jobs)


def _options(new):
    options = (new.unique_key, new.unique_while, new.ttl_s, new.expires_at, new.parent_id)
    return None if options == _NO_OPTIONS else options


_NO_OPTIONS = (None,) * 5


def named_rows(cursor):
    """A cursor's rows as named tuples, a field per column: for the statements that answer
    a row per job of a batch (a dict per row cost more than the rest of reading them)."""
    return list(map(_row_type(tuple(column[0] for column in cursor.description))._make,
                    cursor.fetchall()))


@lru_cache(maxsize=None)  # a class per statement's columns (making one costs more than a batch)
def _row_type(names):
    return namedtuple("Row", names)


def rows(cursor):
    """A cursor's rows as dicts, by column name."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
