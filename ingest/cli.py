"""`proxyloop ingest …`: bring data in from the command line.

Run: `proxyloop ingest proxy FILE.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ground.settings import get_settings

app = typer.Typer(help="Bring data in: publish proxy preferences to Kafka.", no_args_is_help=True)
console = Console(soft_wrap=True)  # no hard wraps in logs and pipes


@app.command()
def proxy(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, one ProxyPreference per line.")],
) -> None:
    """Publish proxy preferences in bulk; returns once the broker acknowledged every one."""
    from ingest.proxy_client import (
        BadProxyLine,
        EventTooLarge,
        ProxyPublisher,
        count_lines,
        example_line,
        read_preferences,
    )

    settings = get_settings()
    total = count_lines(file)
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with ProxyPublisher(settings) as publisher, Progress(*columns, console=console) as progress:
            bar = progress.add_task("publish", total=total)
            for event in read_preferences(file):
                publisher.publish(event)
                progress.advance(bar)
    except BadProxyLine as exc:
        console.print(f"[red]error:[/red] {exc}\nexample line: {example_line()}")
        raise typer.Exit(1) from exc
    except EventTooLarge as exc:
        console.print(f"[red]error:[/red] {exc}; the events before it were published")
        raise typer.Exit(1) from exc
    console.print(f"published {publisher.acknowledged} proxy preferences to {settings.topic_proxy} "
                  f"at {settings.kafka_bootstrap}")
