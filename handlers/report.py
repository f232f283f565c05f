"""`report.csv`: write rows to a CSV file in REPORTS_DIR (default ./reports). A template for
handlers that produce a file.

The file is written to a temporary name in the same folder, flushed to disk and then
renamed over the final name, so a reader sees the old report or the new one, never half
of one, and a retry or a re-run simply writes the same file again.
"""
import csv
import os
import re
import tempfile

from handlers import Permanent, handler

# A plain file name: no folders, no "..", no hidden files.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_cell = {"type": ["string", "number", "boolean", "null"]}
SCHEMA = {
    "type": "object",
    "required": ["name", "columns", "rows"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$", "not": {"pattern": r"\n"}},
        "columns": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "rows": {"type": "array", "items": {"oneOf": [
            {"type": "array", "items": _cell},
            {"type": "object", "additionalProperties": _cell},
        ]}},
    },
}


@handler("report.csv", queue="reports", timeout_s=600, schema=SCHEMA)
def write_report(payload, ctx):
    name = payload["name"]
    if not re.fullmatch(NAME_PATTERN, name):  # the schema is checked at submission; be sure
        raise Permanent(f"unsafe report name {name!r}")
    columns = payload["columns"]
    rows = [_values(row, columns, number) for number, row in enumerate(payload["rows"], 1)]
    folder = os.path.abspath(os.environ.get("REPORTS_DIR", "").strip() or "reports")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name if name.endswith(".csv") else f"{name}.csv")
    write_atomically(path, [columns, *rows])
    return {"path": path, "rows": len(rows)}


def _values(row, columns, number):
    """A row as a list of cells: a list as given, an object by column (missing: empty)."""
    if isinstance(row, dict):
        return [row.get(column) for column in columns]
    if len(row) != len(columns):
        raise Permanent(f"row {number} has {len(row)} values for {len(columns)} columns")
    return row


def write_atomically(path, records):
    folder = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
            csv.writer(out).writerows(records)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it 0600: readers are often another user
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    # The rename itself is durable only once the folder is synced.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
