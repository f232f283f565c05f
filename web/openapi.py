"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json.

Built from what the code checks: submission.SUBMISSION_SCHEMA, each registered handler's payload
schema, the core's statuses and limits. To describe a new route, add its operation to
`PATHS` (a path, a method and an `operation(...)`) and any new shapes to `SCHEMAS`;
tests/test_api_openapi.py fails while a route of the app is missing here.
"""
import copy

from core import history, queues, schedules, selection, submission
from core import status as statuses

MAX_ID = 2 ** 63 - 1
PROBLEM = "application/problem+json"


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema):
    return {"oneOf": [schema, {"type": "null"}]}


TIME = {"type": "string", "format": "date-time"}

SCHEMAS = {
    "Problem": {
        "type": "object",
        "description": "An RFC 9457 problem: what went wrong, with one line of detail.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "string"},
                       "description": "One line per problem, each starting with where it "
                                      "is (a field, a batch index)."},
        },
    },
    "Backoff": {
        "type": "object",
        "required": ["base_s", "max_s"],
        "properties": {"base_s": {"type": "number"}, "max_s": {"type": "number"}},
    },
    "Attempt": {
        "type": "object",
        "required": ["number", "status", "worker_id", "host", "pid", "started_at",
                     "finished_at", "duration_ms", "error_type", "error_message",
                     "traceback", "fenced"],
        "properties": {
            "number": {"type": "integer", "minimum": 1},
            "status": {"enum": list(statuses.ATTEMPT_STATUSES)},
            "worker_id": {"type": "string"},
            "host": nullable({"type": "string"}),
            "pid": nullable({"type": "integer"}),
            "started_at": TIME,
            "finished_at": nullable(TIME),
            "duration_ms": nullable({"type": "number"}),
            "error_type": nullable({"type": "string"}),
            "error_message": nullable({"type": "string"}),
            "traceback": nullable({"type": "string"}),
            "fenced": {"type": "boolean",
                       "description": "A late outcome from this attempt was refused."},
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "type", "queue", "payload", "priority", "run_at", "max_attempts",
                     "timeout_s", "backoff", "status", "attempt", "idempotency_key", "result",
                     "last_error", "created_at", "finished_at"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "type": {"type": "string"},
            "queue": {"type": "string"},
            "payload": {"type": "object"},
            "priority": {"type": "integer"},
            "run_at": TIME,
            "max_attempts": {"type": "integer", "minimum": 1},
            "timeout_s": {"type": "number"},
            "backoff": ref("Backoff"),
            "status": {"enum": list(statuses.STATUSES)},
            "attempt": {"type": "integer", "minimum": 0,
                        "description": "Attempts started so far."},
            "idempotency_key": nullable({"type": "string"}),
            "result": {"description": "What the handler returned (JSON), once succeeded."},
            "progress": {"description": "The latest value the handler passed ctx.progress "
                                        "(any JSON; null until it reports), stored about "
                                        "once a second while it runs, and kept after."},
            "last_error": nullable({"type": "string"}),
            "callback_url": {"type": "string",
                             "description": "Only on jobs submitted with one."},
            "callback": ref("Callback"),
            "created_at": TIME,
            "finished_at": nullable(TIME),
            "dead_reason": nullable({"type": "string",
                                     "description": "Only on dead jobs: permanent or "
                                                    "max_attempts."}),
            "cancel_requested_at": TIME,
            "cancel_reason": {"enum": ["expired"],
                              "description": "Only on a job that expired before it started."},
            "parent_id": {"type": "integer", "minimum": 1,
                          "description": "Only on a follow-up: the job whose success made it "
                                         "(ctx.enqueue)."},
            "unique_key": {"type": "string"},
            "unique_while": {"enum": list(submission.UNIQUE_WHILE)},
            "expires_at": {**TIME, "description": "Not started by then, it never starts."},
            "attempts": {"type": "array", "items": ref("Attempt"),
                         "description": "Only when one job is fetched: oldest first."},
        },
    },
    "Callback": {
        "type": "object",
        "description": "Only on jobs submitted with a callback_url. Once the job ends its "
                       "document is POSTed there, signed `Conveyor-Signature: t=<unix time>,"
                       "v1=<hex HMAC-SHA256 of \"<t>.<body>\">` with the key's callback "
                       "secret (GET /v1/me), and retried with backoff until a 2xx or 24 h "
                       "after the job ended.",
        "required": ["status", "attempts", "last_error"],
        "properties": {
            "status": {"enum": list(statuses.CALLBACK_STATUSES),
                       "description": "pending until a 2xx (delivered) or until it is given "
                                      "up (failed: a refused address, or 24 h)."},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "POSTs made since the job last ended."},
            "last_error": nullable({"type": "string"}),
        },
    },
    "Me": {
        "type": "object",
        "required": ["name", "role", "rate_limit", "callback_secret"],
        "properties": {
            "name": {"type": "string"},
            "role": {"enum": ["submit", "admin"]},
            "rate_limit": {"type": "string", "description": "Its own, else RATE_LIMIT."},
            "callback_secret": {"type": "string",
                                "description": "Signs the callbacks of this key's jobs."},
        },
    },
    "JobPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": ref("Job")},
            "next_cursor": nullable({"type": "string",
                                     "description": "Pass as `cursor` for the next page."}),
        },
    },
    "JobBatch": {
        "type": "object",
        "required": ["jobs"],
        "additionalProperties": False,
        "properties": {
            "jobs": {"type": "array", "minItems": 1, "maxItems": submission.MAX_BATCH,
                     "items": ref("JobSubmission")},
        },
    },
    "JobItems": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("Job")}},
    },
    "Worker": {
        "type": "object",
        "required": ["id", "supervisor_id", "host", "pid", "queues", "started_at",
                     "last_heartbeat_at", "current_job_id"],
        "properties": {
            "id": {"type": "string"},
            "supervisor_id": {"type": "string"},
            "host": {"type": "string"},
            "pid": {"type": "integer"},
            "queues": {"type": "array", "items": {"type": "string"}},
            "started_at": TIME,
            "last_heartbeat_at": TIME,
            "current_job_id": nullable({"type": "integer"}),
        },
    },
    "WorkerPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {"items": {"type": "array", "items": ref("Worker")},
                       "next_cursor": {"type": "null"}},
    },
    "Stats": {
        "type": "object",
        "required": ["queues", "totals", "oldest_available_age_s", "workers_alive"],
        "properties": {
            "queues": {"type": "object",
                       "additionalProperties": {"type": "object",
                                                "additionalProperties": {"type": "integer"}},
                       "description": "Job counts by queue, then by status."},
            "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
            "oldest_available_age_s": {"type": "number", "minimum": 0},
            "workers_alive": {"type": "integer", "minimum": 0},
        },
    },
    "Schedule": {
        "type": "object",
        "required": ["name", "cron", "type", "payload", "queue", "priority", "timezone",
                     "overlap", "paused", "next_run_at", "created_at", "updated_at"],
        "properties": {
            "name": {"type": "string"},
            "cron": {"type": "string", "description": schedules.CRON_FORMAT},
            "type": {"type": "string"},
            "payload": {"type": "object"},
            "queue": nullable({"type": "string"}),
            "priority": {"type": "integer"},
            "timezone": {"type": "string"},
            "overlap": {"enum": ["skip", "allow"]},
            "paused": {"type": "boolean"},
            "next_run_at": nullable(TIME),
            "created_at": TIME,
            "updated_at": TIME,
            "next_runs": {"type": "array", "items": TIME,
                          "description": "Only on one schedule's page: its next slots."},
            "recent_runs": {"type": "array", "items": ref("ScheduleRun"),
                            "description": "Only on one schedule's page: newest first."},
        },
    },
    "ScheduleRun": {
        "type": "object",
        "required": ["slot", "outcome", "job_id", "job_status", "reason", "fired_at"],
        "properties": {
            "slot": TIME,
            "outcome": {"enum": ["enqueued", "skipped", "failed"]},
            "job_id": nullable({"type": "integer"}),
            "job_status": nullable({"enum": list(statuses.STATUSES)}),
            "reason": nullable({"type": "string"}),
            "fired_at": TIME,
        },
    },
    "SchedulePage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": ref("Schedule")},
            "next_cursor": nullable({"type": "string"}),
        },
    },
    "ScheduleCreation": {**schedules.SCHEDULE_SCHEMA,
                         "description": "A recurring job: `cron` read in `timezone` (IANA, "
                                        "default UTC); overlap defaults to skip."},
    "ScheduleChange": {**schedules.CHANGE_SCHEMA,
                       "description": "The fields to change; a new cron or timezone, or a "
                                      "resume, starts from the next slot."},
    "Queue": {
        "type": "object",
        "required": ["name", "counts", "paused", "concurrency", "rate", "updated_at"],
        "properties": {
            "name": {"type": "string"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "The queue's jobs by status, as in Stats (a status "
                                      "without jobs is left out)."},
            "paused": {"type": "boolean",
                       "description": "No attempt of the queue starts while it is paused."},
            "concurrency": nullable({"type": "integer", "minimum": 1,
                                     "description": "At most this many attempts running."}),
            "rate": nullable({"type": "string", "pattern": queues.RATE_PATTERN,
                              "description": "At most N attempts start in any interval "
                                             "of that length."}),
            "updated_at": nullable({**TIME, "description": "When its settings last "
                                                           "changed; null if never set."}),
        },
    },
    "QueuePage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {"items": {"type": "array", "items": ref("Queue")},
                       "next_cursor": {"type": "null"}},
    },
    "QueueChange": {**queues.CHANGE_SCHEMA,
                    "description": "The settings to change; a setting left out keeps its "
                                   "value. They take effect on every host at its next claim."},
    "JobSelection": selection.SELECTION_SCHEMA,
    "Count": {
        "type": "object",
        "required": ["count"],
        "properties": {"count": {"type": "integer", "minimum": 0,
                                 "description": "How many jobs the operation acted on."}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "rate_limit_storage"],
        "properties": {
            "status": {"const": "ok"},
            "rate_limit_storage": {
                "type": "object", "required": ["ok", "on_error"],
                "description": "Whether the rate-limit storage answers, and what becomes "
                               "of requests while it does not (RATE_LIMIT_ON_STORAGE_ERROR).",
                "properties": {"ok": {"type": "boolean"},
                               "on_error": {"enum": ["open", "closed"]}}},
        },
    },
}

RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests allowed in the window (this key's limit).",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "Requests left in the current window.",
                              "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "When the window resets, in epoch seconds.",
                          "schema": {"type": "integer"}},
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                               "required": True, "schema": {"type": "integer", "minimum": 1}}}


def problem(description, headers=None):
    response = {"description": description,
                "content": {PROBLEM: {"schema": ref("Problem")}}}
    if headers:
        response["headers"] = headers
    return response


RESPONSES = {
    "BadRequest": problem("The body is not JSON (or not UTF-8, or nested too deeply)."),
    "Unauthorized": problem("No API key, or an unknown or revoked one.",
                            {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    "Forbidden": problem("A submit key on an admin route."),
    "NotFound": problem("No such job, or one this key may not see."),
    "Conflict": problem("The job's status does not allow this, or the Idempotency-Key was "
                        "used with another body."),
    "TooLarge": problem("The body is over MAX_REQUEST_BYTES or a payload over "
                        "MAX_PAYLOAD_BYTES."),
    "UnsupportedMediaType": problem("The body is not sent as application/json."),
    "Invalid": problem("The request is well-formed JSON but not valid: `errors` says where."),
    "TooManyRequests": problem("Over this key's rate limit, or too many failed "
                               "authentications from this address.",
                               {**RETRY_AFTER, **RATE_HEADERS}),
    "Unavailable": problem("The database or the rate-limit storage does not answer; "
                           "try again.", RETRY_AFTER),
}


def response_ref(name):
    return {"$ref": f"#/components/responses/{name}"}


def json_response(description, schema, headers=None):
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def parameter(name, where, schema, description, required=False):
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


JOB_ID = parameter("job_id", "path", {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                   "The job's id.")
PAGE = [
    parameter("limit", "query", {"type": "integer", "minimum": 1, "maximum": history.MAX_LIMIT,
                                 "default": 50}, "Items per page."),
    parameter("cursor", "query", {"type": "string", "maxLength": 200},
              "The `next_cursor` of the previous page."),
]
NAME_FILTERS = [
    parameter("type", "query", {"type": "string", "pattern": submission.NAME_PATTERN},
              "Only jobs of this type."),
    parameter("queue", "query", {"type": "string", "pattern": submission.NAME_PATTERN},
              "Only jobs in this queue."),
]
STATUS_FILTER = parameter("status", "query", {"enum": list(statuses.STATUSES)},
                          "Only jobs with this status.")
PARENT_FILTER = parameter("parent_id", "query", {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                          "Only the follow-up jobs of this job.")
IDEMPOTENCY_KEY = parameter(
    "Idempotency-Key", "header",
    submission.SUBMISSION_SCHEMA["properties"]["idempotency_key"],
    "The same key (for this API key) with an equal body returns the first job with 200; "
    "with another body, 409. Kept as long as the job is.")


def operation(operation_id, summary, *, tag, access, ok, parameters=(), body=None,
              errors=(), description=None):
    """One operation. access: "public", "submit" or "admin" (which keys may call it);
    ok: the success responses; errors: the names in RESPONSES it may answer with besides
    those every operation with its access and body has."""
    responses = dict(ok)
    names = list(errors)
    if access != "public":
        names += ["Unauthorized", "TooManyRequests", "Unavailable"]
        responses = {status: _with_rate_headers(r) for status, r in responses.items()}
    if access == "admin":
        names.append("Forbidden")
    if body is not None:
        names += ["BadRequest", "TooLarge", "UnsupportedMediaType", "Invalid"]
    for name in names:
        responses[STATUS_OF[name]] = response_ref(name)
    document = {"operationId": operation_id, "summary": summary, "tags": [tag],
                "x-access": access, "responses": dict(sorted(responses.items()))}
    if description:
        document["description"] = description
    if access == "public":
        document["security"] = []
    if parameters:
        document["parameters"] = list(parameters)
    if body is not None:
        document["requestBody"] = {"required": True,
                                   "content": {"application/json": {"schema": body}}}
    return document


STATUS_OF = {"BadRequest": "400", "Unauthorized": "401", "Forbidden": "403", "NotFound": "404",
             "Conflict": "409", "TooLarge": "413", "UnsupportedMediaType": "415",
             "Invalid": "422", "TooManyRequests": "429", "Unavailable": "503"}


def _with_rate_headers(response):
    return {**response, "headers": {**response.get("headers", {}), **RATE_HEADERS}}


JOB = json_response("The job.", ref("Job"))
LOCATED_JOB = {"schema": {"type": "string"}, "required": True,
               "description": "The job's URL."}

SCHEDULE_NAME = parameter("name", "path", {"type": "string", "pattern": schedules.NAME_PATTERN},
                          "The schedule's name.")
LOCATED_SCHEDULE = {"schema": {"type": "string"}, "required": True,
                    "description": "The schedule's URL."}

QUEUE_NAME = parameter("name", "path", {"type": "string", "pattern": submission.NAME_PATTERN},
                       "The queue's name.")

PATHS = {
    "/v1/jobs": {
        "post": operation(
            "submitJob", "Submit one job", tag="jobs", access="submit",
            body=ref("JobSubmission"), parameters=[IDEMPOTENCY_KEY],
            ok={"201": json_response("Stored.", ref("Job"), {"Location": LOCATED_JOB}),
                "200": json_response("The job first stored with this Idempotency-Key.",
                                     ref("Job"), {"Location": LOCATED_JOB})},
            errors=["Conflict"],
            description="The payload is checked against the handler's schema; an unknown "
                        "type or invalid payload is 422. 409: the Idempotency-Key was used "
                        "with another body. 200 and the job that holds it: a job of the "
                        "same type holds the `unique_key` (while queued, or with "
                        "`unique_while: active` until it ends)."),
        "get": operation(
            "listJobs", "List jobs, newest first", tag="jobs", access="submit",
            parameters=[STATUS_FILTER, *NAME_FILTERS, PARENT_FILTER, *PAGE],
            ok={"200": json_response("A page of jobs.", ref("JobPage"))}, errors=["Invalid"],
            description="A submit key sees only its own jobs."),
    },
    "/v1/jobs/batch": {
        "post": operation(
            "submitBatch", "Submit up to 1000 jobs, all or none", tag="jobs", access="submit",
            body=ref("JobBatch"),
            ok={"201": json_response("All stored, in the order given.", ref("JobItems")),
                "200": json_response("Every job was already stored with its idempotency_key.",
                                     ref("JobItems"))},
            errors=["Conflict"],
            description="One transaction: if any job is invalid none is stored, and the 422 "
                        "names each bad index."),
    },
    "/v1/jobs/{job_id}": {
        "get": operation(
            "getJob", "A job with its attempts", tag="jobs", access="submit",
            parameters=[JOB_ID], ok={"200": json_response("The job.", ref("Job"))},
            errors=["NotFound"]),
    },
    "/v1/jobs/{job_id}/cancel": {
        "post": operation(
            "cancelJob", "Cancel a job", tag="jobs", access="submit", parameters=[JOB_ID],
            ok={"200": json_response("Cancelled.", ref("Job")),
                "202": json_response("Running: its worker is being stopped; the job becomes "
                                     "cancelled within seconds.", ref("Job"))},
            errors=["NotFound", "Conflict"],
            description="409 when the job is already succeeded, dead or cancelled."),
    },
    "/v1/jobs/cancel": {
        "post": operation(
            "cancelJobs", "Cancel every matching job", tag="jobs", access="admin",
            body=ref("JobSelection"),
            ok={"200": json_response("How many jobs were cancelled or are being stopped.",
                                     ref("Count"))},
            description="What POST /v1/jobs/{job_id}/cancel does, for every job matching all "
                        "the filters given: waiting jobs are cancelled at once, running ones "
                        "are stopped by their supervisors within 5 s (their attempt recorded "
                        "cancelled); ended jobs are left as they are. `{}` (or no body) "
                        "cancels every job not yet ended. 422 names an unknown or bad "
                        "filter."),
    },
    "/v1/dlq": {
        "get": operation(
            "listDeadJobs", "Dead-lettered jobs, newest first", tag="dlq", access="admin",
            parameters=[*NAME_FILTERS, *PAGE],
            ok={"200": json_response("A page of dead jobs (with dead_reason and last_error).",
                                     ref("JobPage"))},
            errors=["Invalid"]),
    },
    "/v1/dlq/retry": {
        "post": operation(
            "retryDeadJobs", "Run every matching dead job again", tag="dlq", access="admin",
            body=ref("JobSelection"),
            ok={"200": json_response("How many dead jobs went back to the queue.",
                                     ref("Count"))},
            description="What POST /v1/dlq/{job_id}/retry does, for every dead job matching "
                        "all the filters given, in one statement: available again with a "
                        "fresh attempt budget, history kept. `{}` (or no body) retries every "
                        "dead job. 422 names an unknown or bad filter."),
    },
    "/v1/dlq/{job_id}/retry": {
        "post": operation(
            "retryDeadJob", "Run a dead job again with a fresh attempt budget", tag="dlq",
            access="admin", parameters=[JOB_ID],
            ok={"200": json_response("Available again; its history is kept.", ref("Job"))},
            errors=["NotFound", "Conflict"]),
    },
    "/v1/dlq/{job_id}": {
        "delete": operation(
            "discardDeadJob", "Discard a dead job", tag="dlq", access="admin",
            parameters=[JOB_ID],
            ok={"200": json_response("Cancelled; its history is kept.", ref("Job"))},
            errors=["NotFound", "Conflict"]),
    },
    "/v1/schedules": {
        "get": operation(
            "listSchedules", "Schedules by name", tag="schedules", access="admin",
            parameters=PAGE, ok={"200": json_response("A page of schedules.",
                                                      ref("SchedulePage"))},
            errors=["Invalid"]),
        "post": operation(
            "createSchedule", "Create a recurring schedule", tag="schedules", access="admin",
            body=ref("ScheduleCreation"),
            ok={"201": json_response("Created; it first fires at its next slot.",
                                     ref("Schedule"), {"Location": LOCATED_SCHEDULE})},
            errors=["Conflict"],
            description="422 for an invalid cron or one that never fires (30 February), an "
                        "unknown timezone, an unknown job type or a payload that breaks the "
                        "handler's schema; 409 for a taken name."),
    },
    "/v1/schedules/{name}": {
        "get": operation(
            "getSchedule", "A schedule with its next runs and recent runs", tag="schedules",
            access="admin", parameters=[SCHEDULE_NAME],
            ok={"200": json_response("The schedule.", ref("Schedule"))}, errors=["NotFound"]),
        "patch": operation(
            "changeSchedule", "Change, pause or resume a schedule", tag="schedules",
            access="admin", parameters=[SCHEDULE_NAME], body=ref("ScheduleChange"),
            ok={"200": json_response("The changed schedule.", ref("Schedule"))},
            errors=["NotFound"]),
        "delete": operation(
            "deleteSchedule", "Delete a schedule", tag="schedules", access="admin",
            parameters=[SCHEDULE_NAME],
            ok={"204": {"description": "Deleted; jobs it enqueued stay."}},
            errors=["NotFound"]),
    },
    "/v1/queues": {
        "get": operation(
            "listQueues", "Every known queue with its jobs by status and its settings",
            tag="queues", access="admin",
            ok={"200": json_response("Every queue with jobs or settings, by name.",
                                     ref("QueuePage"))},
            errors=["Invalid"], description="422 for any query parameter: it takes none."),
    },
    "/v1/queues/{name}": {
        "patch": operation(
            "changeQueue", "Pause, resume or limit a queue", tag="queues", access="admin",
            parameters=[QUEUE_NAME], body=ref("QueueChange"),
            ok={"200": json_response("The queue with its new settings.", ref("Queue"))},
            errors=["NotFound"],
            description="A queue without jobs may be set too (its settings wait for its "
                        "jobs). A paused queue's jobs stay available (running ones finish); "
                        "a change takes effect on every host within 2 s. 422 for a name "
                        "that is no queue's; 404 when the path is not one name."),
    },
    "/v1/stats": {
        "get": operation("getStats", "Job counts, queue age and live workers", tag="ops",
                         access="admin", ok={"200": json_response("Stats.", ref("Stats"))}),
    },
    "/v1/workers": {
        "get": operation("listWorkers", "Live worker processes", tag="ops", access="admin",
                         ok={"200": json_response("Every live worker.", ref("WorkerPage"))}),
    },
    "/healthz": {
        "get": operation("health", "Whether the API can serve", tag="ops",
                         access="public",
                         ok={"200": json_response("The database answers, and the rate-limit "
                                                  "storage too unless "
                                                  "RATE_LIMIT_ON_STORAGE_ERROR=open.",
                                                  ref("Health"))},
                         errors=["Unavailable"]),
    },
    "/v1/me": {
        "get": operation("me", "The calling key and its callback secret", tag="ops",
                         access="submit", ok={"200": json_response("The key.", ref("Me"))},
                         errors=["Invalid"]),
    },
    "/openapi.json": {
        "get": operation("openapi", "This document", tag="ops", access="public",
                         ok={"200": json_response("OpenAPI 3.1.", {"type": "object"})}),
    },
}


def metrics_operation(public):
    return operation(
        "metrics", "Prometheus metrics, computed from the database", tag="ops",
        access="public" if public else "admin",
        ok={"200": {"description": "The Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}},
        errors=["Unavailable"],
        description="Needs an admin key unless METRICS_PUBLIC=1.")


def submission_schema(registered):
    """submission.SUBMISSION_SCHEMA, with `type` one of the registered handlers and `payload`
    checked against that handler's schema."""
    by_type = []
    for name, handler in sorted(registered.items()):
        branch = {"properties": {"type": {"const": name},
                                 "payload": handler.schema or {"type": "object"}}}
        if handler.payload_errors({}):
            branch["required"] = ["payload"]  # {} (the default payload) would not do
        by_type.append(branch)
    return {"allOf": [copy.deepcopy(submission.SUBMISSION_SCHEMA), {"oneOf": by_type}],
            "not": {"required": ["run_at", "delay_s"]},
            "description": "A job to run. `payload` defaults to {}; the type's handler and "
                           "the settings supply the defaults of the other fields."}


def document(registered, *, metrics_public):
    """The whole OpenAPI document for these handlers and settings."""
    paths = copy.deepcopy(PATHS)
    paths["/metrics"] = {"get": metrics_operation(metrics_public)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conveyor",
            "version": "1",
            "description": "Background jobs on a relational database. Every route but "
                           "/healthz and /openapi.json needs an API key "
                           "(`flask keys create NAME [--admin]`). Errors are RFC 9457 "
                           "problem documents.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": {**copy.deepcopy(SCHEMAS), "JobSubmission": submission_schema(registered)},
            "responses": copy.deepcopy(RESPONSES),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "Authorization: Bearer <key>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
