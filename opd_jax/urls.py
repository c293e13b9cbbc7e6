"""A server's address: the one parser of the http(s) URLs served teachers are given."""

from __future__ import annotations

import urllib.parse

from opd_jax.errors import OpdError


def split_url(url: str, what: str = "url") -> tuple[str, str, int, str]:
    """http(s)://host[:port][/base][/v1] -> (scheme, host, port, base path without /v1); one-line error
    for anything else."""
    u = urllib.parse.urlsplit(str(url))
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme not in ("http", "https") or not u.hostname or port == -1 or u.query or u.fragment:
        raise OpdError(f"{what} {url!r} is not an http(s)://host:port address of a server")
    base = u.path.rstrip("/")
    if base.endswith("/v1"):  # the OpenAI client's form (what vLLM users type): the routes add /v1 themselves
        base = base[:-3]
    return u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80), base
