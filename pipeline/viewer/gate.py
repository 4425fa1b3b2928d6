"""The viewer's front door: no route answers an anonymous request unless it is on a short list.

Gradio guards its data routes itself, but not all of them (reset, cancel, heartbeat, stream, token,
app_id, ... answer anyone), and a Gradio upgrade may add more. `Gate` wraps the whole app and refuses
(401) every request that carries no valid Gradio session cookie, except:

- `/api/v1/*`: the REST API checks HTTP Basic on each route itself (`/api/v1/health` is open);
- what the login page needs before anyone has logged in: `/` (with no session Gradio serves only
  the login form's config: no components, no model card), `/login` (the form's POST),
  `/theme.css`, `/favicon.ico`, and Gradio's own build files under `/assets/` and `/static/`
  (JavaScript, CSS, fonts from the installed package, never from the workspace).

Under `/assets/` and `/static/` only plain relative file names pass (letters, digits, `._-/`, no
empty, `.` or `..` segment): no traversal spelling reaches Gradio's file handlers anonymously.
The gate also records the client's address for the login throttle (`client_address()`), which
Gradio's login does not pass to the auth callable.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar

from starlette.requests import HTTPConnection

OPEN_PATHS = frozenset({"/", "/login", "/login/", "/theme.css", "/favicon.ico"})
OPEN_PREFIXES = ("/assets/", "/static/")
API_PREFIX = "/api/v1/"
_FILE_NAME = re.compile(r"[A-Za-z0-9._/-]+")

_client: ContextVar[str | None] = ContextVar("cxr_viewer_client", default=None)


def client_address() -> str | None:
    """The address of the client whose request is being handled (set by `Gate`)."""
    return _client.get()


def is_open(path: str) -> bool:
    """May an anonymous request reach `path` (decoded, as in the ASGI scope)?"""
    if path.startswith(API_PREFIX) or path in OPEN_PATHS:
        return True
    prefix = next((p for p in OPEN_PREFIXES if path.startswith(p)), None)
    if prefix is None:
        return False
    rest = path[len(prefix):]  # a plain relative file name: no empty, '.' or '..' segment, no odd character
    return bool(_FILE_NAME.fullmatch(rest)) and not any(seg in ("", ".", "..") for seg in rest.split("/"))


class Gate:
    """ASGI middleware: anonymous requests reach only `is_open` paths; the rest get Gradio's 401."""

    def __init__(self, app, gradio_app, auth_message: str = ""):
        self.app, self.gradio_app = app, gradio_app
        self.body = json.dumps({"detail": {"error": "Not authenticated", "auth_message": auth_message}}).encode()

    def signed_in(self, scope) -> bool:
        cookies = HTTPConnection(scope).cookies
        cookie_id = self.gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return bool(token) and token in self.gradio_app.tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        reset = _client.set(client[0] if client else None)
        try:
            if is_open(scope.get("path", "")) or self.signed_in(scope):
                await self.app(scope, receive, send)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(self.body)).encode())]})
                await send({"type": "http.response.body", "body": self.body})
        finally:
            _client.reset(reset)
