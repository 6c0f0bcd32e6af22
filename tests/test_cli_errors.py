"""Operator errors are one `error: …` line on stderr naming what to change, exit code 1, no traceback.

Misconfiguration and unreachable services (closed loopback ports: refused at once) used to end in 50-580-line
tracebacks (the operator-CLI audit). Every case runs in-process through the Typer app except one, which runs the
installed entry point's module as a user would.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from ground.schemas import RetrainRunRecord
from ground.settings import Settings, get_settings
from proxyloop import stack
from proxyloop.cli import app
from proxyloop.components import StackError, _host_port, tcp_open
from proxyloop.testing import free_port, isolated_settings

Run = Callable[..., Result]


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens: a connection is refused at once


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int) -> Iterator[Run]:
    """`proxyloop ARGS` in-process with a fresh home and every service on a closed loopback port; keyword
    arguments set PROXYLOOP_<NAME> for that call."""
    for name in list(os.environ):
        if name.startswith("PROXYLOOP_") and name != "PROXYLOOP_REFERENCE_CACHE_DIR":
            monkeypatch.delenv(name)
    closed = f"127.0.0.1:{closed_port}"
    base = {"HOME": str(tmp_path / "home"), "KAFKA_BOOTSTRAP": closed, "PREFECT_API_URL": f"http://{closed}/api",
            "LABELSTUDIO_URL": f"http://{closed}", "KAFKA_BOOTSTRAP_TIMEOUT_S": "2"}
    monkeypatch.setenv("PREFECT_API_URL", base["PREFECT_API_URL"])  # approve/override export it: undone after

    def run(*args: str, **env: str) -> Result:
        for name, value in {**base, **env}.items():
            monkeypatch.setenv(f"PROXYLOOP_{name}", value)
        get_settings.cache_clear()
        root_handlers = list(logging.getLogger().handlers)
        try:
            return CliRunner().invoke(app, list(args))
        finally:
            get_settings.cache_clear()
            # Prefect's client puts a console handler on the root logger, bound to the runner's stream that is
            # closed once the call returns: a later call's log would print "--- Logging error ---" and a traceback.
            logging.getLogger().handlers[:] = root_handlers

    yield run


def one_error_line(result: Result, *needles: str) -> str:
    """The single stderr line of an operator error; fails on a traceback, another exit code or a missing needle."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # not a traceback
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# 5, 6: malformed settings name the variable, not the field or the source


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("HTTP_PORT", "abc", "as an integer (got 'abc')"),
    ("HTTP_PORT", "70000", "less than or equal to 65535"),
    ("TOPIC_PARTITIONS", "-1", "greater than or equal to 1"),
    ("RETRAIN_MIN_EXPERT", "-5", "greater than or equal to 1"),
    ("CHAT_RECIPE", "notjson", "expected JSON"),
    ("STORE_URL", "localhost/db", "not a usable SQLAlchemy URL"),
    ("STORE_URL", "nosuchdb://h/x", "not a usable SQLAlchemy URL"),
    ("KAFKA_BOOTSTRAP", "127.0.0.1:99999", "port '99999' is not a number in 1-65535"),
    ("KAFKA_BOOTSTRAP", "broker one:9092", "is not host:port"),
    ("CELERY_BROKER", "127.0.0.1:6379", "is not a URL"),
    ("PREFECT_API_URL", "http://127.0.0.1:70000/api", "Port out of range"),
    ("LABELSTUDIO_URL", "127.0.0.1:18080", "is not an http:// or https:// URL"),
    ("MAX_EVENT_BYTES", "2000000", "PROXYLOOP_MAX_EVENT_BYTES (2000000) must not exceed"),
])
def test_a_malformed_setting_is_one_line_naming_its_variable(cli: Run, variable: str, value: str, says: str) -> None:
    line = one_error_line(cli("runs", **{variable: value}), f"PROXYLOOP_{variable}", says)
    assert "Settings" not in line and "EnvSettingsSource" not in line


def test_a_misspelt_setting_is_warned_about_with_the_nearest_name_and_the_command_still_runs(cli: Run) -> None:
    result = cli("runs", EMBEDED_KAFKA="false", NOT_A_THING="1")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: PROXYLOOP_EMBEDED_KAFKA (did you mean PROXYLOOP_EMBEDDED_KAFKA?) names no setting and is ignored "
        "(the settings: ground/settings.py, docs/deploy.md)",
        "warning: PROXYLOOP_NOT_A_THING names no setting and is ignored (the settings: ground/settings.py, "
        "docs/deploy.md)"]


def test_known_settings_draw_no_warning(cli: Run) -> None:
    assert cli("runs", HTTP_PORT="18001", CACHE="/tmp/wheels").stderr == ""  # CACHE: scripts/labelstudio.sh's


def test_the_forms_kafka_python_and_celery_accept_still_pass() -> None:
    for bootstrap in ("broker1:9092,broker2:9092", "kafka", "PLAINTEXT://k1:9092, SSL://k2:9093", "[::1]:19092"):
        assert Settings(kafka_bootstrap=bootstrap).kafka_bootstrap == bootstrap
    for broker in ("redis://redis", "rediss://:pw@r:6380/0", "amqp://guest@rabbit//",
                   "sentinel://s1:26379;sentinel://s2:26379"):
        assert Settings(celery_broker=broker).celery_broker == broker
    assert _host_port("kafka", "kafka_bootstrap") == ("kafka", 9092)
    assert _host_port("PLAINTEXT://k1:9093,k2:9092", "kafka_bootstrap") == ("k1", 9093)
    assert _host_port("redis://redis/0", "celery_broker") == ("redis", 6379)
    assert _host_port("https://prefect.example/api", "prefect_api_url") == ("prefect.example", 443)


def test_an_unreadable_address_is_a_stack_error_naming_the_setting_and_status_reports_it(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="PROXYLOOP_CELERY_BROKER: cannot read host:port"):
        tcp_open("memory://", "celery_broker")
    settings = Settings(home=tmp_path, embedded_redis=False, celery_broker="memory://")
    assert stack.health(settings)["redis"].startswith("misconfigured: PROXYLOOP_CELERY_BROKER")


def test_an_unreachable_store_names_its_url_without_the_password(cli: Run, closed_port: int) -> None:
    line = one_error_line(cli("runs", STORE_URL=f"postgresql+psycopg://u:hunter2@127.0.0.1:{closed_port}/x"),
                          "(PROXYLOOP_STORE_URL) unusable", "Connection refused", "u:***@")
    assert "hunter2" not in line


def test_deadletters_list_json_times_carry_their_utc_offset(cli: Run, tmp_path: Path) -> None:
    """SQLite hands the stored time back naive: the JSON said 2026-12-02T04:00:00, a local time to any reader."""
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from ingest.dead_letters import DeadLetterRow
    from ingest.store import make_engine

    settings = isolated_settings(tmp_path / "home")
    settings.ensure_home()
    with Session(make_engine(settings.resolved_store_url)) as session:
        session.add(DeadLetterRow(topic="t", partition=0, offset=3, sha256="ab", reason_code="not_json", reason="x",
                                  size=1, payload=b"{", dead_lettered_at=datetime(2026, 12, 2, 4, tzinfo=UTC)))
        session.commit()
    listed = cli("deadletters", "list", "--json")
    assert json.loads(listed.stdout)["at"] == "2026-12-02T04:00:00+00:00", listed.output


# 7: an unusable PROXYLOOP_HOME


def test_deadletters_on_a_fresh_machine_list_nothing_and_create_no_home(cli: Run, tmp_path: Path) -> None:
    listed = cli("deadletters", "list")
    assert listed.exit_code == 0 and "0 dead letters" in listed.stdout, listed.output
    assert cli("deadletters", "list", "--json").stdout == ""
    replay = cli("deadletters", "replay")
    assert replay.exit_code == 0 and "nothing to replay" in replay.stdout, replay.output
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("command", [["runs"], ["status"], ["deadletters", "list"], ["up"]])
def test_a_home_that_is_a_file_is_named(cli: Run, tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "file").write_text("")
    one_error_line(cli(*command, HOME=str(tmp_path / "file")),
                   f"PROXYLOOP_HOME {tmp_path / 'file'} is not a writable directory")


def test_up_names_a_home_it_cannot_create(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    one_error_line(cli("up", HOME=str(tmp_path / "file" / "home")), "PROXYLOOP_HOME", "is not a writable directory")


# 8, 9: `ingest proxy` and `deadletters replay` with Kafka down; bad lines


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    from ingest.proxy_client import example_line

    path = tmp_path / "good.jsonl"
    path.write_text(example_line() + "\n")
    return path


def test_ingest_with_kafka_down_says_so_at_once(cli: Run, good_file: Path, closed_port: int) -> None:
    started = time.monotonic()
    one_error_line(cli("ingest", "proxy", str(good_file)),
                   f"Kafka at 127.0.0.1:{closed_port} unreachable (PROXYLOOP_KAFKA_BOOTSTRAP)")
    assert time.monotonic() - started < 10  # kafka-python's bootstrap alone waits 30 s


def test_replay_with_kafka_down_says_so_at_once(cli: Run, tmp_path: Path) -> None:
    from ingest import dead_letters
    from ingest.store import make_engine

    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    refusal = dead_letters.Refusal(topic=settings.topic_proxy, partition=0, offset=7, key=b"k", raw=b"{not json",
                                   reason="not JSON", code="not_json")
    with Session(make_engine(settings.resolved_store_url)) as session:
        dead_letters.record(session, [(refusal, dead_letters.letter_for(settings, refusal))])
        session.commit()
    started = time.monotonic()
    one_error_line(cli("deadletters", "replay"), "unreachable (PROXYLOOP_KAFKA_BOOTSTRAP)")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("second_line", "says"), [
    (b'{"event_id": "x"}', "not a ProxyPreference"),
    (b"\xff\xfe garbage", "not UTF-8 (byte 0xff at column 1)"),
])
def test_a_bad_line_is_named_before_the_broker_is_asked(cli: Run, good_file: Path, second_line: bytes,
                                                        says: str) -> None:
    good_file.write_bytes(good_file.read_bytes() + second_line + b"\n")
    one_error_line(cli("ingest", "proxy", str(good_file)), f"{good_file}:2: {says}", "nothing was published")


def test_a_non_utf8_line_is_a_bad_line_with_its_position(tmp_path: Path) -> None:
    from ingest.proxy_client import BadProxyLine, example_line, read_preferences

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(example_line().encode() + b"\n\n" + b"ok \xc3\x28\n")
    with pytest.raises(BadProxyLine, match=rf"^{path}:3: not UTF-8 \(byte 0xc3 at column 4\)$"):
        list(read_preferences(path))


def test_an_event_over_the_limit_stops_the_file_before_anything_is_sent(cli: Run, tmp_path: Path) -> None:
    from ingest.proxy_client import example_line

    path = tmp_path / "large.jsonl"
    path.write_text(example_line() + "\n" + example_line().replace("0.1, ", "0.1, " * 800) + "\n")
    one_error_line(cli("ingest", "proxy", str(path), MAX_EVENT_BYTES="2000"),
                   "limit is 2000 (PROXYLOOP_MAX_EVENT_BYTES)", "nothing was published")


def test_a_broker_lost_mid_file_says_how_many_were_acknowledged(cli: Run, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest import proxy_client

    class Producer:  # acknowledges two sends, then times out like kafka-python
        sent = 0

        def send(self, *_: Any, **__: Any) -> Any:
            self.sent += 1
            if self.sent > 2:
                raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
            return type("Future", (), {"get": lambda self, timeout=None: None})()

        def flush(self) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr(proxy_client, "connect_producer", lambda settings: Producer())
    path = tmp_path / "five.jsonl"
    path.write_text("".join(proxy_client.example_line().replace("judge-1", f"judge-{i}") + "\n" for i in range(5)))
    one_error_line(cli("ingest", "proxy", str(path)), "(PROXYLOOP_KAFKA_BOOTSTRAP)",
                   "stopped after 2 of 5 events were acknowledged")


# 10: approve / override with an unknown run or Prefect down


def test_approve_without_a_store_names_the_run(cli: Run) -> None:
    one_error_line(cli("approve", "no-such-run"), "no retrain run 'no-such-run'", "PROXYLOOP_HOME")


@pytest.fixture
def stored_run(tmp_path: Path) -> str:
    from ingest.store import make_engine, record_run

    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    with Session(make_engine(settings.resolved_store_url)) as session:
        record_run(session, RetrainRunRecord(run_id="run-1"), "gated")
        session.commit()
    return "run-1"


def test_an_unknown_run_is_named_before_prefect_is_asked(cli: Run, stored_run: str) -> None:
    one_error_line(cli("override", "no-such-run", "--reason", "test"), "no retrain run 'no-such-run'")


def test_prefect_down_is_one_line_naming_its_url(cli: Run, stored_run: str, closed_port: int) -> None:
    one_error_line(cli("approve", stored_run),
                   f"Prefect at http://127.0.0.1:{closed_port}/api unreachable (PROXYLOOP_PREFECT_API_URL)")


# 11: Label Studio down


@pytest.mark.parametrize("command", ["setup", "reconcile"])
def test_labelstudio_down_names_its_url(cli: Run, command: str, closed_port: int) -> None:
    one_error_line(cli("labelstudio", command, LABELSTUDIO_TOKEN="abc"),
                   f"Label Studio at http://127.0.0.1:{closed_port} unreachable (PROXYLOOP_LABELSTUDIO_URL)")


# the boundary itself


def test_contract_into_an_unusable_directory_is_one_line(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    one_error_line(cli("contract", str(tmp_path / "file" / "docs")), f"{tmp_path / 'file' / 'docs'}: Not a directory")


def test_debug_keeps_the_traceback(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for result in (cli("--debug", "runs", HOME=str(tmp_path / "file")),
                   cli("runs", HOME=str(tmp_path / "file"), DEBUG="1")):
        assert result.exit_code == 1 and "is not a writable directory" in str(result.exception)
        assert not isinstance(result.exception, SystemExit)


def test_a_bug_keeps_its_traceback(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyloop import operations

    monkeypatch.setattr(operations, "recent_runs", lambda settings: 1 / 0)
    assert isinstance(cli("runs").exception, ZeroDivisionError)


def test_the_installed_command_prints_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYLOOP_")}
    done = subprocess.run([sys.executable, "-m", "proxyloop.cli", "runs"], capture_output=True, text=True, timeout=60,
                          env={**env, "PROXYLOOP_HOME": str(tmp_path), "PROXYLOOP_HTTP_PORT": "abc"})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("error: PROXYLOOP_HTTP_PORT: Input should be a valid integer, unable to parse string as "
                           "an integer (got 'abc')\n")


def test_child_processes_read_a_json_setting_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """str() of a dict is no JSON: a stack started with PROXYLOOP_CHAT_RECIPE set failed in every child."""
    recipe = {"beta": 0.2, "simplex_dim": 4}
    monkeypatch.setenv("PROXYLOOP_CHAT_RECIPE", stack.child_env(Settings(chat_recipe=recipe))["PROXYLOOP_CHAT_RECIPE"])
    assert Settings().chat_recipe == recipe


def test_a_damaged_registry_file_is_one_line_naming_it(cli: Run, tmp_path: Path) -> None:
    """`status` read the aliases raw: a damaged aliases.json was a traceback; now the registry's own error."""
    policy = tmp_path / "home" / "registry" / "demo"
    policy.mkdir(parents=True)
    (policy / "aliases.json").write_text("{not json")
    result = cli("status", REGISTRY_URL=str(tmp_path / "home" / "registry"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "aliases.json cannot be read" in result.output
