"""Scenario 6 of the fault-injection harness: many processes writing one SQLite file are
killed -9 mid-write, again and again."""
import pytest

from harness import seed, sqlite_kills

KILL_SECONDS = 15


@pytest.mark.slow
def test_sqlite_file_survives_writers_killed_mid_write(tmp_path, monkeypatch):
    from conftest import Conveyor
    conveyor = Conveyor(f"sqlite:///{tmp_path}/conveyor.db", tmp_path, monkeypatch)
    try:
        figures = sqlite_kills(conveyor, KILL_SECONDS, seed())
    finally:
        conveyor.close()
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.kills >= 50 and figures.jobs >= 300, figures.line()
