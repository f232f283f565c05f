"""The schedule routes of SPEC §6/§8 through the real app on both databases: create,
read (next runs, recent runs), change, pause/resume, delete, and every refusal."""
import base64
import json

import pytest

from core import schedules
from apiserver import api  # noqa: F401 (fixture)
from conftest import rules
from models import Job

NIGHTLY = {"name": "nightly", "cron": "0 3 * * *", "type": "t.noop", "payload": {"n": 1},
           "timezone": "Europe/Berlin"}


def test_created_schedule_is_201_with_location_and_its_next_runs(api):
    admin = api.key("ops", "admin")
    response = api.call("POST", "/v1/schedules", admin, json=NIGHTLY)
    assert response.status_code == 201, response.get_json()
    assert response.headers["Location"] == "/v1/schedules/nightly"
    created = response.get_json()
    assert {k: created[k] for k in ("name", "cron", "type", "payload", "timezone", "overlap",
                                    "paused", "queue", "priority")} == {
        **NIGHTLY, "overlap": "skip", "paused": False, "queue": None, "priority": 0}
    assert len(created["next_runs"]) == 5 and created["next_runs"][0] == created["next_run_at"]
    assert all(t.endswith(("T01:00:00.000Z", "T02:00:00.000Z")) for t in created["next_runs"])
    assert created["recent_runs"] == []
    assert Job.select().count() == 0  # nothing fires before the next slot


def test_schedule_page_shows_recent_runs_with_their_outcomes(api):
    admin = api.key("ops", "admin")
    api.call("POST", "/v1/schedules", admin, json={**NIGHTLY, "cron": "* * * * *"})
    slot = schedules.get("nightly").next_run_at
    [first] = schedules.fire_due(slot, rules=rules())
    schedules.fire_due(slot + 60, rules=rules())  # skipped: the first run has not finished
    page = api.call("GET", "/v1/schedules/nightly", admin).get_json()
    assert [(r["outcome"], r["job_id"], r["job_status"]) for r in page["recent_runs"]] == [
        ("skipped", None, None), ("enqueued", first.job_id, "available")]
    assert "still available" in page["recent_runs"][0]["reason"]


def test_patch_changes_pauses_and_resumes(api):
    admin = api.key("ops", "admin")
    api.call("POST", "/v1/schedules", admin, json=NIGHTLY)
    paused = api.call("PATCH", "/v1/schedules/nightly", admin, json={"paused": True})
    assert paused.status_code == 200
    assert paused.get_json()["paused"] is True and paused.get_json()["next_run_at"] is None
    assert paused.get_json()["next_runs"] == []
    changed = api.call("PATCH", "/v1/schedules/nightly", admin,
                       json={"paused": False, "cron": "15 * * * *", "timezone": "UTC",
                             "overlap": "allow", "priority": 3}).get_json()
    assert (changed["cron"], changed["overlap"], changed["priority"], changed["paused"]) == (
        "15 * * * *", "allow", 3, False)
    assert changed["next_run_at"].endswith(":15:00.000Z")


def test_delete_is_a_204_without_body_headers_then_404(api):
    admin = api.key("ops", "admin")
    api.call("POST", "/v1/schedules", admin, json=NIGHTLY)
    deleted = api.call("DELETE", "/v1/schedules/nightly", admin)
    assert deleted.status_code == 204 and deleted.get_data() == b""
    assert "Content-Type" not in deleted.headers and "Content-Length" not in deleted.headers
    gone = api.call("GET", "/v1/schedules/nightly", admin)
    assert gone.status_code == 404 and gone.mimetype == "application/problem+json"
    assert api.call("DELETE", "/v1/schedules/nightly", admin).status_code == 404


def test_list_pages_by_name(api):
    admin = api.key("ops", "admin")
    for name in ("c-three", "a-one", "b-two"):
        assert api.call("POST", "/v1/schedules", admin,
                        json={**NIGHTLY, "name": name}).status_code == 201
    first = api.call("GET", "/v1/schedules?limit=2", admin).get_json()
    assert [s["name"] for s in first["items"]] == ["a-one", "b-two"] and first["next_cursor"]
    rest = api.call("GET", f"/v1/schedules?limit=2&cursor={first['next_cursor']}", admin)
    assert [s["name"] for s in rest.get_json()["items"]] == ["c-three"]
    assert rest.get_json()["next_cursor"] is None


@pytest.mark.parametrize("after", ["\ud800", "\udfff\ud800", "a\u0000", "\u0000", "Has Spaces",
                                   "x" * 300, 7, None, ["a-one"]])
def test_a_cursor_holding_no_schedule_name_is_422_invalid_request(api, after):
    admin = api.key("ops", "admin")
    api.call("POST", "/v1/schedules", admin, json={**NIGHTLY, "name": "a-one"})
    cursor = base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()
    response = api.call("GET", f"/v1/schedules?cursor={cursor}", admin)
    assert response.status_code == 422, response.get_data()
    assert response.get_json()["title"] == "Invalid request"
    assert response.get_json()["errors"] == ["cursor: invalid"]


@pytest.mark.parametrize("change, status, where", [
    ({"cron": "61 * * * *"}, 422, "cron"),
    ({"cron": "every day"}, 422, "cron"),
    ({"cron": "0 0 30 2 *"}, 422, "cron: no date matches"),
    ({"cron": "0 0 31 2 *"}, 422, "cron: no date matches"),
    ({"cron": "0 12 31 4,6 *"}, 422, "cron: no date matches"),
    ({"timezone": "Atlantis/Capital"}, 422, "timezone"),
    ({"timezone": "America"}, 422, "timezone"),
    ({"timezone": "zone.tab"}, 422, "timezone"),
    ({"type": "no.such.type"}, 422, "type"),
    ({"type": "t.schema", "payload": {"to": 1}}, 422, "payload/to"),
    ({"name": "Has Spaces"}, 422, "name"),
    ({"overlap": "maybe"}, 422, "overlap"),
    ({"surprise": 1}, 422, "(schedule)"),
])
def test_invalid_schedules_are_422_invalid_schedule_naming_the_field(api, change, status, where):
    admin = api.key("ops", "admin")
    response = api.call("POST", "/v1/schedules", admin, json={**NIGHTLY, **change})
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["title"] == "Invalid schedule"
    assert any(error.startswith(where) for error in response.get_json()["errors"])
    assert schedules.list_schedules()[0] == []


def test_a_taken_name_is_409(api):
    admin = api.key("ops", "admin")
    assert api.call("POST", "/v1/schedules", admin, json=NIGHTLY).status_code == 201
    again = api.call("POST", "/v1/schedules", admin, json={**NIGHTLY, "cron": "0 4 * * *"})
    assert again.status_code == 409
    assert schedules.get("nightly").cron == "0 3 * * *"


@pytest.mark.parametrize("change", [{"cron": "nope"}, {"timezone": "Nowhere/Land"},
                                    {"cron": "0 0 30 2 *"}, {"cron": "0 0 31 11 *"},
                                    {"timezone": "Etc"}, {"unknown": True}, {}])
def test_invalid_changes_are_422_invalid_schedule_and_change_nothing(api, change):
    admin = api.key("ops", "admin")
    api.call("POST", "/v1/schedules", admin, json=NIGHTLY)
    response = api.call("PATCH", "/v1/schedules/nightly", admin, json=change)
    assert response.status_code == 422 and response.get_json()["title"] == "Invalid schedule"
    assert schedules.get("nightly").cron == NIGHTLY["cron"]
    assert schedules.get("nightly").timezone == NIGHTLY["timezone"]


@pytest.mark.parametrize("name", ["missing", "%00", "a%00b", "x" * 300, "UPPER"])
def test_unknown_or_malformed_names_are_404(api, name):
    admin = api.key("ops", "admin")
    for method in ("GET", "PATCH", "DELETE"):
        response = api.call(method, f"/v1/schedules/{name}", admin,
                            json={"paused": True} if method == "PATCH" else None)
        assert response.status_code == 404, (method, name, response.get_json())


def test_schedules_are_admin_only(api):
    submit = api.key("app")
    for method, path in (("GET", "/v1/schedules"), ("POST", "/v1/schedules"),
                         ("GET", "/v1/schedules/nightly"), ("PATCH", "/v1/schedules/nightly"),
                         ("DELETE", "/v1/schedules/nightly")):
        response = api.call(method, path, submit, json=NIGHTLY if method == "POST" else None)
        assert response.status_code == 403, (method, path)
    assert api.call("GET", "/v1/schedules").status_code == 401
