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

Before any route sees a request, the gate also
- believes `X-Forwarded-For`/`-Proto` only from CXR_TRUSTED_PROXIES (uvicorn's own middleware does the
  rewriting) and drops every `X-Forwarded-*`/`Forwarded` header from anyone else, so a client cannot
  pick the address the login throttle counts, nor the host Gradio builds its URLs from;
- bounds bodies: `POST /api/v1/feedback` (JSON marks, HTTP Basic) to `CXR_FEEDBACK_BODY_BYTES`;
  without a session, and on the login route always, a few kB (`CXR_ANON_BODY_BYTES`)
  by declared length and as they stream (the login form is parsed in full before any check), and
  no file part in a login (Gradio's login page posts multipart fields, but a file part would be
  spooled to disk); with a session, the upload limit, and at most `CXR_MAX_FILES_PER_UPLOAD` files
  in a Gradio upload;
- adds `X-Frame-Options`, CSP `frame-ancestors`, `X-Content-Type-Options` and `Referrer-Policy` to
  every response.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar

from starlette.requests import HTTPConnection
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from pipeline.viewer.limits import BodyTooLarge, Limits, capped_receive, read_small_body, replay

OPEN_PATHS = frozenset({"/", "/login", "/login/", "/theme.css", "/favicon.ico"})
OPEN_PREFIXES = ("/assets/", "/static/")
API_PREFIX = "/api/v1/"
PREDICT_PATH = "/api/v1/predict"
FEEDBACK_PATH = "/api/v1/feedback"
LOGIN_PATHS = frozenset({"/login", "/login/"})
# Gradio's own login page posts its two fields as multipart FormData: fields pass, a file part does not
LOGIN_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
_FILE_PART = re.compile(rb"(?im)^content-disposition:[^\r\n]*\bfilename\*?\s*=")
UPLOAD_PATH = "/gradio_api/upload"
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
_FORWARDED = re.compile(rb"^(x-forwarded-.*|forwarded|x-real-ip)$")
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


def _header(scope, name: bytes) -> bytes:
    return next((v for k, v in scope.get("headers", []) if k == name), b"")


def _boundary(content_type: bytes) -> bytes | None:
    """The multipart boundary, as sent (it is case-sensitive)."""
    m = re.search(rb"(?i)boundary=\"?([^\";]+)\"?", content_type)
    return m.group(1).strip() if m else None


class Gate:
    """ASGI middleware in front of everything: proxy headers, body limits, security headers, and
    anonymous requests reach only `is_open` paths (the rest get Gradio's 401)."""

    def __init__(self, app, gradio_app, auth_message: str = "", limits: Limits | None = None):
        self.app, self.gradio_app = app, gradio_app
        self.limits = limits or Limits()
        self.body = json.dumps({"detail": {"error": "Not authenticated", "auth_message": auth_message}}).encode()
        self.proxy = ProxyHeadersMiddleware(self._gated, list(self.limits.trusted_proxies))

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
        if not client or client[0] not in self.proxy.trusted_hosts:
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if not _FORWARDED.match(k)]}
        await self.proxy(scope, receive, send)   # rewrites client and scheme for a trusted proxy only

    async def _gated(self, scope, receive, send):
        client = scope.get("client")
        reset = _client.set(client[0] if client else None)
        try:
            if scope["type"] == "websocket":
                if is_open(scope.get("path", "")) or self.signed_in(scope):
                    await self.app(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
            started = []
            send = _with_security_headers(send, started)
            path = scope.get("path", "")
            signed_in = self.signed_in(scope)
            if not signed_in and not is_open(path):
                await _respond(send, 401, self.body)
                return
            receive = await self._bounded(scope, receive, send, path, signed_in)
            if receive is None:
                return
            try:
                await self.app(scope, receive, send)
            except BodyTooLarge as err:   # raised in a body read that no framework handler caught
                if started:
                    raise
                await _respond_json(send, 413, err.detail)
        finally:
            _client.reset(reset)

    async def _bounded(self, scope, receive, send, path: str, signed_in: bool):
        """`receive` bounded as this request may be, or None when it has been refused already."""
        ctype = _header(scope, b"content-type").lower()
        declared = _header(scope, b"content-length")
        login = path in LOGIN_PATHS
        small = login or not (signed_in or path in (PREDICT_PATH, FEEDBACK_PATH))
        limit = (self.limits.anonymous_body_bytes if small else self.limits.feedback_body_bytes
                 if path == FEEDBACK_PATH else self.limits.signed_in_body_bytes)
        if login and scope.get("method") == "POST" and not ctype.startswith(LOGIN_TYPES):
            await _respond_json(send, 415, "the login form takes form fields only")
            return None
        if declared.isdigit() and int(declared) > limit:
            await _respond_json(send, 413, f"the request body exceeds the limit of {limit} bytes")
            return None
        if small and not path.startswith(API_PREFIX):
            body = await read_small_body(receive, limit)   # a few kB at most: read it all before the app runs
            if body is None:
                await _respond_json(send, 413, f"the request body exceeds the limit of {limit} bytes")
                return None
            if login and _FILE_PART.search(body):   # the parser would spool a file part to disk
                await _respond_json(send, 415, "the login form takes form fields only, no file")
                return None
            return replay(body, receive)
        upload = signed_in and path == UPLOAD_PATH and ctype.startswith(b"multipart/")
        return capped_receive(receive, limit, self.limits.files_per_upload if upload else None,
                              _boundary(_header(scope, b"content-type")) if upload else None)


def _with_security_headers(send, started: list):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            started.append(True)
            have = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)
    return wrapped


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send, status: int, message: str) -> None:
    await _respond(send, status, json.dumps({"error": message}).encode())
