"""Checks of the service addresses in Settings, run when a PROXYLOOP_ variable is read.

Why: a typo should name its variable at once rather than surface later as a timeout, or a traceback from
`up`/`status`/httpx. Every form the client libraries take keeps working.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# What kafka-python takes per comma-separated entry: host, host:port or [ipv6]:port, maybe PROTOCOL:// first.
_BOOTSTRAP = re.compile(r"(?:[A-Za-z_]+://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[^:]*))?")


def _check_port(port: object, url: str | None = None) -> None:
    """A port given as such, or the one in `url` (none given: fine, the scheme's default)."""
    try:
        port = urlsplit(url).port if url is not None else port  # ValueError: not a number, or above 65535
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if port is not None and not (str(port).isdigit() and 1 <= int(str(port)) <= 65_535):
        raise ValueError(f"port {port!r} is not a number in 1-65535")


def bootstrap_servers(value: str) -> str:
    for entry in value.split(","):
        match = _BOOTSTRAP.fullmatch(entry.strip())
        if match is None:
            raise ValueError(f"{entry.strip()!r} is not host:port (brokers are comma-separated)")
        _check_port(match["port"])
    return value


def celery_url(value: str) -> str:
    for url in value.split(";"):  # redis, rediss, amqp, sentinel lists joined by ';' …: a scheme, a valid port
        if "://" not in url:
            raise ValueError(f"{url!r} is not a URL such as redis://127.0.0.1:6379/0")
        _check_port(None, url)
    return value


def http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    _check_port(None, value)
    return value


def sqlalchemy_url(value: str) -> str:
    if not value:
        return value
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
        url.get_dialect()
    except ArgumentError as exc:  # NoSuchModuleError too; neither message repeats the URL (its password)
        raise ValueError(f"not a usable SQLAlchemy URL ({exc}), e.g. postgresql+psycopg://u:pw@host/db") from None
    _check_port(url.port)
    return value
