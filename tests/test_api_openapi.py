"""GET /openapi.json describes every route (a route added without its description fails
here), and the live app keeps to it: Schemathesis generates valid and invalid requests
from the document and checks that no response is a 5xx and every response conforms.
"""
import os
import re
import subprocess
import sys

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis import checks as builtin
from schemathesis.specs.openapi import checks as openapi_checks

import conftest
import handlers
from core import submission
from web import openapi
from apiserver import Gunicorn, api  # noqa: F401 (fixture)

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # HEAD: Flask's twin of every GET; OPTIONS: a 405


def routes_of(app):
    """{(METHOD, /path/{param})} served by the app."""
    served = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        served |= {(method, path) for method in rule.methods - IGNORED_METHODS}
    return served


def documented(document):
    return {(method.upper(), path) for path, operations in document["paths"].items()
            for method in operations}


def test_every_route_is_described_and_every_description_is_a_route(api):
    document = api.client.get("/openapi.json").get_json()
    assert routes_of(api.app) == documented(document)


def test_every_path_parameter_is_declared_and_every_operation_answers_something(api):
    document = api.client.get("/openapi.json").get_json()
    for path, operations in document["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, (method, path)
            assert operation["responses"] and operation["summary"], (method, path)
            assert any(status.startswith("2") for status in operation["responses"]), (method, path)


def test_the_document_is_openapi_3_1_with_valid_schemas_and_the_core_submission_schema(api):
    response = api.client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    assert document["openapi"].startswith("3.1")
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    described = document["components"]["schemas"]["JobSubmission"]
    assert described["allOf"][0] == submission.SUBMISSION_SCHEMA
    types = {branch["properties"]["type"]["const"] for branch in described["allOf"][1]["oneOf"]}
    assert {"echo", "t.noop", "t.schema"} <= types
    validate(document)  # against the OpenAPI 3.1 specification's own schema
    validate(openapi.document(handlers.registered(), metrics_public=True))


# ---------------------------------------------------------------------------- schemathesis

@pytest.fixture(scope="module")
def live_api(tmp_path_factory, worker_id, testrun_uid):
    """A real gunicorn on its own database (PostgreSQL when there is one), with an admin key
    and a few jobs for the generated ids to find."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    pg_name = f"conveyor_schemathesis_{worker_id}_{testrun_uid[:8]}"
    if conftest._pg["url"]:
        url = conftest.create_pg_database(pg_name)
    else:
        url = f"sqlite:///{tmp}/conveyor.db"
    env = {**os.environ, **conftest.FAST_ENV, "DATABASE_URL": url,
           "RATE_LIMIT": "100000/second", "AUTH_FAIL_LIMIT": "100000/minute",
           "MAX_PAYLOAD_BYTES": "4096", "MAX_REQUEST_BYTES": "65536"}
    subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=conftest.ROOT,
                   env=env, capture_output=True, check=True)  # the release phase
    key = subprocess.run(
        [sys.executable, "-m", "flask", "keys", "create", "fuzzer", "--admin"],
        cwd=conftest.ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    server = Gunicorn(env, tmp / "gunicorn.log", workers=1)
    seeded = requests.post(f"{server.url}/v1/jobs/batch", headers={"Authorization": f"Bearer {key}"},
                           json={"jobs": [{"type": "t.noop", "payload": {"n": n}, "queue": "q"}
                                          for n in range(5)]}, timeout=30)
    assert seeded.status_code == 201
    yield server, key
    server.stop()
    assert "Traceback" not in server.log(), server.log()[-3000:]
    if conftest._pg["url"]:
        conftest.drop_pg_database(pg_name)


def local_document():
    """The document the test app serves: the test handlers loaded, metrics behind a key."""
    handlers.load([conftest.TEST_HANDLERS])
    return openapi.document(handlers.registered(), metrics_public=False)


# Built at import, as the tests are parametrized by operation at collection; the live
# server is checked to serve this very document.
DOCUMENT = local_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    # 413 (a payload over MAX_PAYLOAD_BYTES) is a refusal too.
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]}},
}))

EXAMPLES = 40
CHECKS = [
    builtin.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.missing_required_header,
    openapi_checks.unsupported_method,
    openapi_checks.ignored_auth,
]


OPERATIONS = sorted(documented(DOCUMENT), key=lambda op: (op[1], op[0]))


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_live_api_keeps_to_its_document(live_api, method, path):
    """Valid and invalid requests (EXAMPLES per operation): no 5xx, every response as
    documented, invalid input refused, and the key really needed."""
    server, key = live_api
    operation = schema[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE)
    if operation.body or any(True for _ in operation.iter_parameters()):
        cases = st.one_of(cases, operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=cases)
    def exchange(case):
        case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                               checks=CHECKS, timeout=30)

    exchange()


def test_the_live_api_serves_the_document_it_is_checked_against(live_api):
    server, _ = live_api
    assert requests.get(f"{server.url}/openapi.json", timeout=10).json() == DOCUMENT
