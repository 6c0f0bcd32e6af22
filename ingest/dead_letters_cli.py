"""`proxyloop deadletters …`: see what ingest refused and why, and re-drive it after a fix.

Run: `proxyloop deadletters list [--reason too_large]`, `proxyloop deadletters replay --reason contract`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from ground.moments import as_utc
from ground.settings import OperatorError, Settings, get_settings

if TYPE_CHECKING:
    from ingest.dead_letters import DeadLetterRow

app = typer.Typer(help="Dead-lettered records: list them, replay them after a fix.", no_args_is_help=True)
console = Console(soft_wrap=True)

Reason = Annotated[str | None, typer.Option(help="Only this reason code (too_large, not_json, contract, …).")]
Since = Annotated[str | None, typer.Option(help="Only letters from this time on (ISO 8601; naive means UTC).")]


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"--since {value!r} is not ISO 8601, e.g. 2026-11-29T17:00") from exc
    return as_utc(moment)


def _find(settings: Settings, reason: str | None, since: str | None) -> list[DeadLetterRow]:
    """The matching letters, or none while there is no store yet (a fresh machine before `up`): listing should
    neither create the store nor fail for want of it."""
    from ingest import dead_letters
    from ingest.store import make_engine

    when = _since(since)
    if not settings.store_exists():
        return []
    with Session(make_engine(settings.resolved_store_url)) as session:
        return list(dead_letters.find(session, reason=reason, since=when))


@app.command("list")
def list_letters(reason: Reason = None, since: Since = None,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON object per letter.")] = False) -> None:
    """Every dead-lettered record, oldest first: when, why, where, how large, whether replayed."""
    rows = _find(get_settings(), reason, since)
    if as_json:
        for row in rows:
            typer.echo(json.dumps({
                "at": as_utc(row.dead_lettered_at).isoformat(), "reason_code": row.reason_code, "reason": row.reason,
                "topic": row.topic, "partition": row.partition, "offset": row.offset, "size": row.size,
                "sha256": row.sha256, "payload_uri": row.payload_uri, "replays": row.replays}))
        return
    table = Table("at", "reason", "record", "bytes", "replays", "detail", title=f"{len(rows)} dead letters")
    for row in rows:
        table.add_row(f"{row.dead_lettered_at:%Y-%m-%d %H:%M:%S}", row.reason_code,
                      f"{row.topic}:{row.partition}:{row.offset}", str(row.size), str(row.replays), row.reason[:120])
    console.print(table)


@app.command()
def replay(
    reason: Reason = None, since: Since = None,
    again: Annotated[bool, typer.Option(help="Also replay letters replayed before (harmless: copies are no-ops).")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="Show what would be replayed, publish nothing.")] = False,
) -> None:
    """Publish dead-lettered records again to their topic, e.g. after a contract change or a raised limit."""
    from ingest import dead_letters
    from ingest.proxy_client import connect_producer
    from ingest.store import make_engine

    settings = get_settings()
    when = _since(since)
    if not settings.store_exists():  # a fresh machine: nothing was ever dead-lettered
        console.print("0 dead letters would be replayed" if dry_run else "nothing to replay")
        return
    with Session(make_engine(settings.resolved_store_url)) as session:
        rows = dead_letters.find(session, reason=reason, since=when, replayed=None if again else False)
        if dry_run or not rows:
            console.print(f"{len(rows)} dead letters would be replayed" if dry_run else "nothing to replay")
            return
        producer = connect_producer(settings)  # BrokerUnreachable names PROXYLOOP_KAFKA_BOOTSTRAP, without 30 s
        try:
            done = dead_letters.replay(session, producer, rows)
        except dead_letters.PayloadMissing as exc:
            raise OperatorError(f"{exc}; nothing was marked replayed") from exc
        finally:
            producer.close()
        session.commit()
    topics = sorted({r.topic for r in done})
    console.print(f"replayed {len(done)} records to {', '.join(topics)}; the consumer stores what now passes "
                  "and dead-letters the rest again")
