"""The viewer's resource limits, read once from the environment, and the small tools that enforce them.

Every limit has a default a clinic can run with as it is; each is an environment variable:

| variable | default | bounds |
|---|---|---|
| CXR_MAX_UPLOAD_MB | 20 | one uploaded file (REST and Gradio), and any signed-in request body |
| CXR_MAX_PIXELS | 20,000,000 | decoded image size (pipeline/viewer/inference.py's; a third of training's) |
| CXR_MAX_FILES_PER_UPLOAD | 1 | file parts in one Gradio upload request |
| CXR_ANON_BODY_BYTES | 4096 | the body of any request without a session (the login form) |
| CXR_FEEDBACK_BODY_BYTES | 262144 | one `POST /api/v1/feedback` (JSON marks; ~100 bytes a mark) |
| CXR_MAX_INFLIGHT | 4 | REST predicts holding an upload at once; more get 429 + Retry-After |
| CXR_QUEUE_SIZE | 32 | Gradio UI analyses waiting in its queue; more are refused by Gradio |
| CXR_HEADER_TIMEOUT_S | 10 | from connection (or the previous response) to a request's full headers |
| CXR_BODY_TIMEOUT_S | 120 | from a request's headers to the end of its body |
| CXR_MAX_CONNECTIONS | 100 | open connections; requests beyond get 503 |
| CXR_UPLOAD_TTL_S | 600 | an uploaded file never analysed (closed tab, direct upload) is deleted after this |
| CXR_TRUSTED_PROXIES | (none) | addresses whose X-Forwarded-* headers are believed ("*" for any) |
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.exceptions import HTTPException

MB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024   # multipart framing around one file
# a third of what training accepts: the largest flat-panel chest films are ~19 Mpixel (4320 x 4320), and a
# 60 Mpixel PNG of a few hundred kB costs ~1 GB and 3 s to decode
VIEWER_MAX_PIXELS = 20_000_000


def env_number(name: str, default: float) -> float:
    """$name as a finite number above 0 (`default` when unset); a clear error naming the variable."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else float(default)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 * MB
    max_pixels: int = VIEWER_MAX_PIXELS
    files_per_upload: int = 1
    anonymous_body_bytes: int = 4096
    feedback_body_bytes: int = 256 * 1024
    max_inflight: int = 4
    queue_size: int = 32
    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0
    max_connections: int = 100
    upload_ttl_s: float = 600.0
    trusted_proxies: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, *, max_upload_mb: float | None = None, queue_size: int | None = None) -> "Limits":
        d = cls()
        proxies = tuple(p.strip() for p in os.environ.get("CXR_TRUSTED_PROXIES", "").split(",") if p.strip())
        return cls(
            max_upload_bytes=int((max_upload_mb or env_number("CXR_MAX_UPLOAD_MB", d.max_upload_bytes / MB)) * MB),
            max_pixels=int(env_number("CXR_MAX_PIXELS", d.max_pixels)),
            files_per_upload=int(env_number("CXR_MAX_FILES_PER_UPLOAD", d.files_per_upload)),
            anonymous_body_bytes=int(env_number("CXR_ANON_BODY_BYTES", d.anonymous_body_bytes)),
            feedback_body_bytes=int(env_number("CXR_FEEDBACK_BODY_BYTES", d.feedback_body_bytes)),
            max_inflight=int(env_number("CXR_MAX_INFLIGHT", d.max_inflight)),
            queue_size=int(queue_size or env_number("CXR_QUEUE_SIZE", d.queue_size)),
            header_timeout_s=env_number("CXR_HEADER_TIMEOUT_S", d.header_timeout_s),
            body_timeout_s=env_number("CXR_BODY_TIMEOUT_S", d.body_timeout_s),
            max_connections=int(env_number("CXR_MAX_CONNECTIONS", d.max_connections)),
            upload_ttl_s=env_number("CXR_UPLOAD_TTL_S", d.upload_ttl_s),
            trusted_proxies=proxies)

    @property
    def signed_in_body_bytes(self) -> int:
        return self.max_upload_bytes + MULTIPART_SLACK


class BodyTooLarge(HTTPException):
    """413 raised from inside a body read: the framework's exception handlers turn it into a response."""

    def __init__(self, detail: str):
        super().__init__(413, detail)


def capped_receive(receive, max_bytes: int, max_parts: int | None = None, boundary: bytes | None = None):
    """`receive` that raises BodyTooLarge once the body passes `max_bytes`, or — for multipart with
    `boundary` — holds more than `max_parts` parts (counted as they stream, before anything is parsed)."""
    seen = 0
    delimiter = b"--" + boundary if boundary else None
    tail, delimiters = b"", 0

    async def wrapped():
        nonlocal seen, tail, delimiters
        message = await receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            seen += len(body)
            if seen > max_bytes:
                raise BodyTooLarge(f"the request body exceeds the limit of {max_bytes} bytes")
            if delimiter is not None and max_parts is not None:
                window = tail + body
                delimiters += window.count(delimiter) - tail.count(delimiter)
                tail = window[-(len(delimiter) - 1):] if len(delimiter) > 1 else b""
                if delimiters - 1 > max_parts:   # n parts have n + 1 delimiters (the last closes the body)
                    raise BodyTooLarge(f"more than {max_parts} file(s) in one upload")
        return message

    return wrapped


async def read_small_body(receive, max_bytes: int) -> bytes | None:
    """The whole body if it is at most `max_bytes`, else None (stops reading at the limit)."""
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        body = message.get("body", b"")
        seen += len(body)
        if seen > max_bytes:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that hands the app `body` (already read) in one message, then defers to `receive`."""
    sent = False

    async def wrapped():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


class InFlight:
    """A counter of work in progress that refuses, rather than queues, beyond its limit: a request that
    waited would hold its upload in memory while it waits."""

    def __init__(self, limit: int):
        self.limit, self.count = int(limit), 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self):
        with self._lock:
            if self.count >= self.limit:
                raise Busy(self.limit)
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class Busy(Exception):
    """Every slot is taken: answer 429 with Retry-After."""

    def __init__(self, limit: int):
        super().__init__(f"the viewer is busy ({limit} analyses in progress): try again shortly")
        self.retry_after = 2
