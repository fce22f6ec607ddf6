"""What a worker talks to, said once at start: every endpoint (passwords redacted), and a warning for
each one that does not answer.

A half-configured deployment (say, ``HEIMDALL_CACHE_URL`` left at its compose default on a host
where ``redis`` does not resolve) otherwise runs silently slow or silently without a cache. The
probe is a TCP connect with a short timeout; it proves reachability, not credentials.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..settings import Settings, redact_url

__all__ = ["Endpoint", "endpoints", "probe", "check_endpoints"]

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "pyamqp": 5672, "redis": 6379, "rediss": 6380,
                  "postgresql": 5432, "postgres": 5432, "http": 80, "https": 443}


@dataclass(frozen=True)
class Endpoint:
    """One server a worker uses: its role, its URL with the password redacted, and where to reach it."""

    role: str  #: broker, result backend, cache, database, object store
    url: str  #: redacted
    host: str | None  #: None: nothing to reach over the network (SQLite, the embedded broker)
    port: int | None


def _endpoint(role: str, url: str) -> Endpoint:
    parts = urlsplit(url.split("+", 1)[1] if "+" in url.split("://", 1)[0] else url)
    port = None
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: reported as unreachable by probe()
        pass
    host = parts.hostname if parts.scheme in _DEFAULT_PORTS else None
    return Endpoint(role, redact_url(url), host, port or _DEFAULT_PORTS.get(parts.scheme))


def endpoints(settings: Settings) -> list[Endpoint]:
    """Every endpoint these settings use (each URL of a broker failover list ``a;b;c`` separately)."""
    out = [_endpoint("broker", u.strip()) for u in settings.broker_url.split(";") if u.strip()]
    out.append(_endpoint("result backend", settings.result_backend))
    if settings.cache_url:
        out.append(_endpoint("cache", settings.cache_url))
    out.append(_endpoint("database", settings.database_url))
    if settings.s3_endpoint_url:
        out.append(_endpoint("object store", settings.s3_endpoint_url))
    return out


def probe(ep: Endpoint, timeout_s: float = 1.0) -> str | None:
    """Why the endpoint does not accept a TCP connection, or None when it does (or has no network address)."""
    if ep.host is None:
        return None
    if ep.port is None:
        return "no port"
    try:
        with socket.create_connection((ep.host, ep.port), timeout=timeout_s):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def check_endpoints(settings: Settings, timeout_s: float = 1.0) -> dict[str, str | None]:
    """Log every endpoint, warn about each one that does not answer; returns url -> problem (or None)."""
    out: dict[str, str | None] = {}
    for ep in endpoints(settings):
        problem = probe(ep, timeout_s)
        out[f"{ep.role} {ep.url}"] = problem
        if problem is None:
            log.info("%s: %s", ep.role, ep.url)
        else:
            log.warning("%s: %s does not answer (%s); check its URL and the server", ep.role, ep.url, problem)
    return out
