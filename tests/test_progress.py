"""Progress in a log file is whole lines at a steady pace; in a terminal it is tqdm's bar."""

import io

import pytest
from tqdm.std import tqdm as std_tqdm

from unetcell import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_a_log_gets_whole_lines_without_redraws(clock):
    log = io.StringIO()
    items = []
    for item in progress.tqdm(range(4), desc="files", unit="file", file=log, leave=False):
        items.append(item)
        clock[0] += 20.0  # a line every 30 s: after the 2nd and the 4th file, then the total
    assert items == [0, 1, 2, 3]
    assert log.getvalue().splitlines() == [
        "files: 2/4 files (50%), 0:00:40 elapsed, about 0:00:40 left",
        "files: 4/4 files (100%), 0:01:20 elapsed, about 0:00:00 left",
        "files: 4/4 files in 0:01:20",
    ]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_updates_by_batch_with_a_total_and_one_closing_line(clock):
    log = io.StringIO()
    with progress.tqdm(total=100, desc="a.tif", unit="tile", file=log) as bar:
        for _ in range(10):
            clock[0] += 5.0
            bar.update(10)
    assert log.getvalue().splitlines() == [
        "a.tif: 60/100 tiles (60%), 0:00:30 elapsed, about 0:00:20 left",
        "a.tif: 100/100 tiles in 0:00:50",
    ]


def test_disabled_progress_writes_nothing(clock):
    log = io.StringIO()
    with progress.tqdm(total=3, desc="a.tif", unit="tile", file=log, disable=True) as bar:
        clock[0] += 100.0
        bar.update(3)
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdms_own_bar():
    bar = progress.tqdm(total=3, desc="a.tif", unit="tile", file=_Terminal())
    try:
        assert isinstance(bar, std_tqdm)
    finally:
        bar.close()
    assert isinstance(progress.tqdm(total=3, file=io.StringIO()), progress.LogLines)
