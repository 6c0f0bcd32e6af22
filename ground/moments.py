"""Times on the wire and in the store: always with a zone, kept in UTC.

Imports nothing of ours; the contract (ground/schemas/) types its events' moments with `Moment`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A naive time read as UTC: SQLite hands timezone-aware columns back naive, and users type times without
    a zone; every time proxyloop stores is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _in_utc_range(moment: datetime) -> datetime:
    try:  # the store keeps versions in UTC, where 0001-01-01T00:00+05:00 has no moment (year 0)
        moment.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"{moment.isoformat()} is out of range in UTC") from exc
    return moment


# With its zone: a naive time cannot be ordered against an aware one, so the wire refuses it.
Moment = Annotated[AwareDatetime, AfterValidator(_in_utc_range)]
