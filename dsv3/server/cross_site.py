"""Keeping web pages out: a page the user opens may send requests to a server on 127.0.0.1.

Three locks, as a browser sees them: a POST body must be `application/json` (a page can send a form or
text body to any address without asking, never JSON); a server listening on loopback answers only
requests whose Host header names loopback (or `--allowed-hosts`), so a DNS-rebinding page that reaches it
under its own name gets a 400; and no CORS header goes out unless `--allowed-origins` names the pages that
may read the answers.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.responses import JSONResponse

from dsv3.errors import UsageError
from dsv3.server.protocol import APIError

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def parse_list(flag: str, value: str | None) -> list[str] | None:
    """A flag's list: a JSON list (as vLLM takes --allowed-origins) or comma-separated names."""
    if value is None:
        return None
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except ValueError as e:
            raise UsageError(f"{flag}: not a JSON list ({e})") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise UsageError(f"{flag}: expected a JSON list of strings, got {value}")
    else:
        items = [item.strip() for item in value.split(",")]
    items = [item for item in items if item]
    if not items:
        raise UsageError(f"{flag}: empty list")
    return items


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: requests whose Host header names none of `allowed` get a 400 ('*' allows any)."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header).lower() not in self.allowed:
                error = APIError(f"the Host header {header!r} is not a name this server answers to "
                                 f"({', '.join(sorted(self.allowed))}; --allowed-hosts adds names)")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json_body(content_type: str | None) -> None:
    """415 unless the body is declared JSON."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(f"the request body must be sent as Content-Type: application/json, got "
                       f"{media or 'no Content-Type'}", status=415)
