"""No request gets a 5xx (SPEC §6), on both databases: Hypothesis sends every route the app
serves (read from its URL map, so a new route is covered the day it is added) generated
path ids and names, the filters, limits and cursors /openapi.json says it takes (cursors:
base64 of arbitrary JSON and bytes) and unknown ones, Idempotency-Key headers, and bodies:
jobs, batches, schedules and schedule changes whose crons range from valid to never firing
(30 February) and whose timezones from IANA names to directories of the zone database, and
queue settings from valid to absurd.
Every answer must be below 500, and every refusal a problem document. Schemathesis
(test_api_openapi.py) checks the API against its document on one database; this test
goes where the document does not, on both. Derandomized: every run sends the same requests.
"""
import base64
import json
import re
from urllib.parse import quote

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core import history, schedules
from core import status as statuses
from apiserver import api_with  # noqa: F401 (fixture)
from conftest import rules

EXAMPLES = 30  # per route and method: about 20 s per database
SEEDED_SCHEDULE = "nightly"

TRICKY = ["\ud800", "a\x00b", "\x00", "\udfff\ud800", "", "\u202e", "'; DROP TABLE jobs; --",
          "%00", "..", "America", "Etc", "x" * 300, "9" * 30, "-1", "1e400", "null"]
text = st.one_of(st.sampled_from(TRICKY),
                 st.text(st.characters(categories=["L", "N", "P", "S", "Zs", "Cc", "Cs"]),
                         max_size=40))
names = st.one_of(st.sampled_from([SEEDED_SCHEDULE, "t.noop", "echo", "default", "q", "UPPER"]),
                  st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True), text)
integers = st.one_of(st.integers(-10, 10), st.integers(-2 ** 70, 2 ** 70))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), integers, st.floats(allow_nan=False), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(text, inner, max_size=3)),
    max_leaves=8)

# Crons from valid to never firing: fields that each exist, in combinations that may not.
CRON_FIELD = st.sampled_from(["*", "0", "1", "5", "*/15", "*/100000", "1-5", "2-1", "29", "30",
                              "31", "2", "4", "L", "15W", "5#5", "5#6", "7", "60", "99999999999",
                              "jan", "FEB", "sun", "H", "?", ""])
NEVER_FIRING = ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4 *", "0 0 31 6 *", "0 0 31 9 *",
                "0 0 31 11 *", "0 0 30,31 2 *", "0 0 31 2,4 *", "0 0 30 2 * 0"]
crons = st.one_of(st.sampled_from(NEVER_FIRING),
                  st.sampled_from(["* * * * *", "0 3 * * *", "0 0 29 2 *", "0 0 L 2 *",
                                   "@hourly", "@reboot", "* * * * * *", "* * * *"]),
                  st.lists(CRON_FIELD, min_size=4, max_size=7).map(" ".join), text)
timezones = st.one_of(st.sampled_from(["America", "UTC", "Europe/Berlin", "Pacific/Apia",
                                       "Australia/Lord_Howe", "Etc", "zone.tab",
                                       "right/UTC", "../../etc/passwd", "Factory"]), text)


def _b64(raw, padded):
    encoded = base64.urlsafe_b64encode(raw).decode()
    return encoded if padded else encoded.rstrip("=")


def _json_bytes(value):
    return json.dumps(value).encode()


cursors = st.one_of(
    st.builds(_b64, st.one_of(text, json_values).map(lambda after: _json_bytes({"after": after})),
              st.booleans()),
    st.builds(_b64, st.one_of(json_values.map(_json_bytes), st.binary(max_size=40)), st.booleans()),
    text)

# Bodies near valid, with one field or more from the hostile strategies above: a refusal
# of the first bad field must not hide a crash on the next.
json_objects = st.one_of(st.just({}), st.dictionaries(text, json_values, max_size=3))
types = st.one_of(st.sampled_from(["t.noop", "echo"]), text)
job_bodies = st.fixed_dictionaries(
    {"type": types},
    optional={"payload": json_objects, "queue": names, "priority": integers,
              "run_at": st.one_of(text, st.sampled_from(["9999-12-31T23:59:59-23:59",
                                                         "2030-01-01T00:00:00Z"])),
              "delay_s": st.one_of(integers, st.floats()), "max_attempts": integers,
              "idempotency_key": text})
schedule_fields = {"payload": json_objects, "queue": st.one_of(st.none(), names),
                   "priority": integers, "timezone": timezones,
                   "overlap": st.sampled_from(["skip", "allow", "never"]),
                   "paused": st.one_of(st.booleans(), json_values)}
schedule_bodies = st.fixed_dictionaries({"name": names, "cron": crons, "type": types},
                                        optional=schedule_fields)
schedule_changes = st.fixed_dictionaries({"cron": crons},
                                         optional={"type": types, **schedule_fields})
queue_changes = st.fixed_dictionaries({}, optional={
    "paused": st.one_of(st.booleans(), json_values),
    "concurrency": st.one_of(st.none(), integers, st.floats(), json_values),
    "rate": st.one_of(st.none(), st.sampled_from(["10/second", "1000000/hour", "1000001/hour",
                                                  "0/minute", "1e3/second", "10/day"]),
                      text, json_values)})
BODIES = {("POST", "/v1/jobs"): job_bodies,
          ("POST", "/v1/jobs/batch"): st.lists(job_bodies, max_size=3).map(
              lambda items: {"jobs": items}),
          ("POST", "/v1/schedules"): schedule_bodies,
          ("PATCH", "/v1/schedules/<name>"): schedule_changes,
          ("PATCH", "/v1/queues/<name>"): queue_changes}

QUERY_VALUES = {"status": st.one_of(st.sampled_from(statuses.STATUSES), text),
                "type": names, "queue": names, "cursor": cursors,
                "limit": st.one_of(st.integers(1, history.MAX_LIMIT), integers).map(str) | text}


def queries(known):
    """Query parameters: some of those a route takes, now and then with unknown ones."""
    taken = st.lists(st.sampled_from(known), max_size=3, unique=True) if known else st.just([])
    unknown = st.sampled_from([0, 0, 0, 1]).flatmap(lambda n: st.lists(text, min_size=n,
                                                                       max_size=n))
    keys = st.tuples(taken, unknown).map(lambda both: both[0] + both[1])
    return keys.flatmap(lambda chosen: st.fixed_dictionaries(
        {key: QUERY_VALUES.get(key, text) for key in chosen}))


PATH_VALUES = {"job_id": st.one_of(st.integers(1, 5), integers).map(str)}
PARAMETER = r"<(?:([^:<>]+):)?([^<>]+)>"  # <converter:name> or <name> in a Flask rule


def encoded(value):
    """Percent-encoded as a client would send it; a lone surrogate as the bytes it cannot
    be, which the server must then decode."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def routes_of(api):
    """(method, rule, the query parameters /openapi.json says it takes) of every route the
    app serves."""
    document = api.call("GET", "/openapi.json").get_json()
    routes = []
    for rule in api.app.url_map.iter_rules():
        described = document["paths"].get(re.sub(PARAMETER, r"{\2}", rule.rule), {})
        for method in sorted(rule.methods):
            operation = described.get("get" if method == "HEAD" else method.lower(), {})
            routes.append((method, rule.rule, sorted(
                p["name"] for p in operation.get("parameters", []) if p["in"] == "query")))
    return routes


def requests_to(method, rule, known_queries):
    """(path, query string, body) for one route: its path parameters, query parameters, and
    the body it takes (or any JSON, or bytes)."""
    parameters = st.fixed_dictionaries({name: PATH_VALUES.get(converter, names)
                                        for converter, name in re.findall(PARAMETER, rule)})
    bodies = st.one_of(BODIES.get((method, rule), json_values).map(json.dumps),
                       json_values.map(json.dumps), st.binary(max_size=30))

    def built(path_parameters, query, body):
        path = re.sub(PARAMETER, lambda m: encoded(path_parameters[m.group(2)]), rule)
        return path, "&".join(f"{encoded(k)}={encoded(v)}" for k, v in query.items()), body

    return st.builds(built, parameters, queries(known_queries), bodies)


def ensure_schedule():
    """A schedule for generated changes to reach (a generated DELETE may remove it)."""
    if schedules.Schedule.get_or_none(name=SEEDED_SCHEDULE) is None:
        schedules.create({"name": SEEDED_SCHEDULE, "cron": "0 3 * * *", "type": "t.noop"}, rules())


def test_no_request_to_any_route_gets_a_5xx(api_with):
    api = api_with(RATE_LIMIT="1000000/second", AUTH_FAIL_LIMIT="1000000/minute",
                   MAX_PAYLOAD_BYTES=4096)
    keys = {"admin": api.key("admin", "admin"), "submit": api.key("app")}
    for n in range(3):  # jobs for the generated ids to find
        api.conveyor.submit("t.noop", {"n": n}, queue="q")

    for method, rule, known_queries in routes_of(api):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
        @given(request=requests_to(method, rule, known_queries), key=st.sampled_from(sorted(keys)),
               idempotency_key=st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20,
                                                                          max_codepoint=0xff))))
        def exchange(request, key, idempotency_key):
            ensure_schedule()
            path, query, body = request
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
            response = api.call(method, path, keys[key], headers=headers, query_string=query,
                                data=body, content_type="application/json")
            assert response.status_code < 500, (method, path, query, body, response.get_data())
            if response.status_code >= 400 and method != "HEAD":
                assert response.mimetype == "application/problem+json", response.get_data()

        exchange()
