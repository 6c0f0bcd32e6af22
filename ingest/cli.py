"""`proxyloop ingest …`: bring data in from the command line.

Run: `proxyloop ingest proxy FILE.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ground.settings import OperatorError, get_settings

app = typer.Typer(help="Bring data in: publish proxy preferences to Kafka.", no_args_is_help=True)
console = Console(soft_wrap=True)  # no hard wraps in logs and pipes


@app.command()
def proxy(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, one ProxyPreference per line.")],
) -> None:
    """Publish proxy preferences in bulk; returns once the broker acknowledged every one. The whole file is
    checked first: a bad line stops it with nothing published."""
    from kafka.errors import KafkaError

    from ingest.proxy_client import (
        BadProxyLine,
        EventTooLarge,
        ProxyPublisher,
        check_file,
        example_line,
        read_preferences,
    )

    settings = get_settings()
    try:
        total = check_file(file, settings)  # before connecting: a bad line is named even with the broker down
    except BadProxyLine as exc:
        raise OperatorError(f"{exc}; nothing was published. A valid line: {example_line()}") from exc
    except EventTooLarge as exc:
        raise OperatorError(f"{exc}; nothing was published") from exc
    publisher = ProxyPublisher(settings)  # BrokerUnreachable, naming PROXYLOOP_KAFKA_BOOTSTRAP
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with publisher, Progress(*columns, console=console) as progress:
            bar = progress.add_task("publish", total=total)
            for event in read_preferences(file):
                publisher.publish(event)
                progress.advance(bar)
    except (BadProxyLine, EventTooLarge, KafkaError) as exc:  # the file changed under us, or the broker went away
        what = f"Kafka at {settings.kafka_bootstrap} (PROXYLOOP_KAFKA_BOOTSTRAP): {exc}" \
            if isinstance(exc, KafkaError) else str(exc)
        raise OperatorError(f"{what}; stopped after {publisher.acknowledged} of {total} events were acknowledged "
                            "(publishing the file again is safe: events are upserted by id)") from exc
    console.print(f"published {publisher.acknowledged} proxy preferences to {settings.topic_proxy} "
                  f"at {settings.kafka_bootstrap}")
