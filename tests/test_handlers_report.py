"""`report.csv` with real workers: the file holds exactly the rows, appears whole or not at
all, stays inside REPORTS_DIR, and a re-run overwrites it."""
import csv
import os
import threading

import pytest

from conftest import wait_for
from core.errors import Invalid


@pytest.fixture
def reports_dir(tmp_path):
    return tmp_path / "reports"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_the_report_holds_exactly_the_rows_and_no_temp_file_is_left(conveyor, reports_dir):
    payload = {"name": "sales-2030-01", "columns": ["region", "units", "note"],
               "rows": [["north", 12, "a, \"quoted\"\nnote"],
                        {"region": "south", "units": 7.5},
                        ["east", None, "ünïcode"]]}
    job_id = conveyor.submit("report.csv", payload)
    conveyor.start_supervisor(REPORTS_DIR=reports_dir)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    path = str(reports_dir / "sales-2030-01.csv")
    assert (job.status, job.result) == ("succeeded", {"path": path, "rows": 3})
    assert read_csv(path) == [["region", "units", "note"],
                              ["north", "12", "a, \"quoted\"\nnote"],
                              ["south", "7.5", ""],
                              ["east", "", "ünïcode"]]
    assert os.listdir(reports_dir) == ["sales-2030-01.csv"]


def test_a_rerun_overwrites_the_same_file(conveyor, reports_dir):
    conveyor.start_supervisor(REPORTS_DIR=reports_dir)
    for rows in ([["first"], ["run"]], [["second"]]):
        job_id = conveyor.submit("report.csv", {"name": "daily.csv", "columns": ["c"],
                                                "rows": rows})
        assert conveyor.wait_for_status(job_id, "succeeded", "dead").status == "succeeded"

    assert read_csv(reports_dir / "daily.csv") == [["c"], ["second"]]
    assert os.listdir(reports_dir) == ["daily.csv"]


def test_readers_never_see_a_partial_report(conveyor, reports_dir):
    rows = 5_000
    path = reports_dir / "big.csv"
    seen, broken = set(), []
    done = threading.Event()

    def read_while_written():
        while not done.is_set():
            try:
                lines = read_csv(path)
            except FileNotFoundError:
                continue
            versions = {line[0] for line in lines[1:]}
            if len(lines) != rows + 1 or len(versions) != 1:
                broken.append((len(lines), versions))
            seen.update(versions)

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        conveyor.start_supervisor(concurrency=1, REPORTS_DIR=reports_dir)
        ids = conveyor.submit_many("report.csv", [
            {"name": "big", "columns": ["version", "n"],
             "rows": [[f"v{version}", n] for n in range(rows)]} for version in range(4)])
        conveyor.wait_until_final(ids)
        wait_for(lambda: "v3" in seen, message="the reader to see the last version")
    finally:
        done.set()
        reader.join()

    assert set(conveyor.statuses(ids).values()) == {"succeeded"}
    assert broken == []
    assert os.listdir(reports_dir) == ["big.csv"]


def test_a_row_that_does_not_fit_the_columns_is_permanent(conveyor, reports_dir):
    job_id = conveyor.submit("report.csv", {"name": "bad", "columns": ["a", "b"],
                                            "rows": [["1", "2"], ["3"]]})
    conveyor.start_supervisor(REPORTS_DIR=reports_dir)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.dead_reason) == ("dead", "permanent")
    assert "row 2 has 1 values for 2 columns" in job.last_error
    assert not reports_dir.exists() or os.listdir(reports_dir) == []


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "/etc/passwd", ".hidden",
                                  "report\n", "", "x" * 101])
def test_unsafe_names_are_refused_at_submission(conveyor, name):
    with pytest.raises(Invalid):
        conveyor.submit("report.csv", {"name": name, "columns": ["a"], "rows": []})
