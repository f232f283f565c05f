"""Named statements, read from a file of SQL: each statement under a line `-- name: NAME`,
its comment lines after that (what it does, and why) kept in the file, not sent."""
import json
import os
import re

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


def rows(cursor):
    """A cursor's rows as dicts, by column name."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
