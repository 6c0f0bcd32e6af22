"""How long a flow waits for a Celery task: as long as the task makes progress, and no longer than TASK_TIMEOUT_S
without any. Before, the limit ran from the send: a training past 30 minutes failed its flow while it reported
progress. A fake result and clock here; tests/flows/test_lost_tasks.py runs real workers."""

from __future__ import annotations

from typing import Any

import pytest

import flows.celery_tasks as ct


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Result:
    """A task that reports progress every `every_s` until `done_s`, then succeeds; PENDING for ever if never."""

    def __init__(self, clock: _Clock, every_s: float, done_s: float | None) -> None:
        self.clock, self.every_s, self.done_s = clock, every_s, done_s

    @property
    def state(self) -> str:
        if self.done_s is None:
            return "PENDING"
        return "SUCCESS" if self.clock.now >= self.done_s else "PROGRESS"

    @property
    def info(self) -> dict[str, Any]:
        return {"step": int(self.clock.now // self.every_s)}

    def get(self, timeout: float) -> dict[str, Any]:
        return {"run_id": "r"}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(ct.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(ct.time, "sleep", fake.sleep)
    monkeypatch.setattr(ct, "result_app", lambda: None)
    return fake


def _result_is(monkeypatch: pytest.MonkeyPatch, result: _Result) -> None:
    monkeypatch.setattr(ct, "AsyncResult", lambda task_id, app: result)
    monkeypatch.setattr(ct._Watch, "_look", lambda self, current: None)  # no broker to look in


def test_a_task_that_keeps_reporting_progress_is_waited_for_past_the_timeout(
        clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    _result_is(monkeypatch, _Result(clock, every_s=60, done_s=3 * ct.TASK_TIMEOUT_S))
    assert ct.wait_for_task("r") == {"run_id": "r"}
    assert clock.now >= 3 * ct.TASK_TIMEOUT_S


def test_a_task_with_no_progress_for_the_timeout_fails_the_wait(clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    _result_is(monkeypatch, _Result(clock, every_s=60, done_s=None))
    with pytest.raises(ct.TrainingFailed, match=f"PENDING with no progress for {ct.TASK_TIMEOUT_S} s"):
        ct.wait_for_task("r")
    assert ct.TASK_TIMEOUT_S < clock.now <= ct.TASK_TIMEOUT_S + 1


def test_a_task_sent_again_and_again_without_progress_still_fails_the_wait(
        clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each look that resends (or finds the task lost) restarts the look's own clock, not the wait's: a task whose
    workers keep dying would otherwise be resent for ever."""
    _result_is(monkeypatch, _Result(clock, every_s=60, done_s=None))
    monkeypatch.setattr(ct._Watch, "_stale", lambda self, current: True)
    resends: list[float] = []

    def look(self: ct._Watch, current: str) -> None:
        self.changed = clock.now  # what a resend (or a lost task that cannot be resent) does
        resends.append(clock.now)

    monkeypatch.setattr(ct._Watch, "_look", look)
    with pytest.raises(ct.TrainingFailed, match="no progress"):
        ct.wait_for_task("r", resend=lambda: None)
    assert len(resends) > 100 and clock.now <= ct.TASK_TIMEOUT_S + 1
