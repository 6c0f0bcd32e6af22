"""`PROXYLOOP_WORKER_TORCH_THREADS`: each worker process limits torch's CPU threads when Celery starts it."""

from collections.abc import Iterator

import pytest
import torch
from celery.signals import worker_process_init

import workers.app  # noqa: F401 - connects the handler, as the worker's import of the app does
from ground.settings import get_settings


@pytest.fixture
def threads_restored() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)
    get_settings.cache_clear()


def _start_worker_process(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PROXYLOOP_WORKER_TORCH_THREADS", value)
    get_settings.cache_clear()
    worker_process_init.send(sender=None)  # what Celery's prefork pool sends in each new child


def test_a_worker_process_takes_the_configured_thread_count(
    monkeypatch: pytest.MonkeyPatch, threads_restored: int,
) -> None:
    torch.set_num_threads(2)
    _start_worker_process(monkeypatch, "1")
    assert torch.get_num_threads() == 1


def test_zero_leaves_torchs_own_choice(monkeypatch: pytest.MonkeyPatch, threads_restored: int) -> None:
    torch.set_num_threads(2)
    _start_worker_process(monkeypatch, "0")
    assert torch.get_num_threads() == 2
