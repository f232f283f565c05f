"""Which jobs a bulk operation acts on (SPEC §12: `POST /v1/dlq/retry`, `POST /v1/jobs/cancel`
and their `flask ... --all` commands): a job's type, queue, group and creation time, each
optional; no filter at all selects every job the operation applies to."""
from typing import NamedTuple, Optional

from jsonschema import Draft202012Validator

from core.errors import InvalidJob, InvalidRequest
from core.submission import NAME_PATTERN, SUBMISSION_SCHEMA
from core.times import parse_time
from models import Job

SELECTION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "pattern": NAME_PATTERN, "description": "Only jobs of this type."},
        "queue": {"type": "string", "pattern": NAME_PATTERN,
                  "description": "Only jobs in this queue."},
        "group": {**SUBMISSION_SCHEMA["properties"]["group"],
                  "description": "Only jobs submitted with this `group`."},
        "created_before": {"type": "string", "format": "date-time", "maxLength": 64,
                           "description": "Only jobs created before this time (RFC 3339 "
                                          "with an offset)."},
    },
    "description": "Filters, all optional, that a job must all match; `{}` (or no body) "
                   "selects every job the operation applies to.",
}
_validator = Draft202012Validator(SELECTION_SCHEMA)
FILTERS = tuple(SELECTION_SCHEMA["properties"])


class Selection(NamedTuple):
    """Checked filters; None matches any. created_before is epoch seconds."""
    type: Optional[str] = None
    queue: Optional[str] = None
    group: Optional[str] = None
    created_before: Optional[float] = None

    def conditions(self):
        """The filters as conditions on `jobs` (none when nothing is filtered)."""
        wanted = [(Job.type, self.type), (Job.queue, self.queue), (Job.group_key, self.group)]
        found = [column == value for column, value in wanted if value is not None]
        if self.created_before is not None:
            found.append(Job.created_at < self.created_before)
        return found

    def describe(self):
        """The filters in a few words, for the log."""
        named = [f"{name} {value!r}" for name, value in self._asdict().items()
                 if value is not None]
        return ", ".join(named) or "every job"


def read(filters):
    """The Selection that filters (a request's JSON body, or the CLI's options) names;
    InvalidRequest naming each bad or unknown field."""
    errors = []
    for error in _validator.iter_errors(filters):
        if error.validator == "additionalProperties":
            errors += [f"{name}: not a filter (the filters are {', '.join(FILTERS)})"
                       for name in sorted(set(error.instance) - set(FILTERS))]
        else:
            where = "/".join(map(str, error.absolute_path)) or "(filters)"
            reason = "not a valid name" if error.validator == "pattern" else error.message
            errors.append(f"{where}: {reason}")
    if errors:
        raise InvalidRequest("the filters are not valid: send an object with any of "
                             f"{', '.join(FILTERS)}", errors)
    selection = Selection(**{name: filters[name] for name in ("type", "queue", "group")
                             if name in filters})
    if "created_before" in filters:
        try:
            before = parse_time(filters["created_before"], "created_before")
        except InvalidJob as exc:  # the same refusal, of a filter rather than of a job
            raise InvalidRequest(exc.detail, exc.errors) from None
        selection = selection._replace(created_before=before)
    return selection
