"""Serving the viewer with uvicorn: read deadlines, a connection cap, no trust in proxy headers by
default, and the private upload folder removed on SIGTERM and SIGINT.

uvicorn has a keep-alive timeout between requests but no deadline for reading one: a client that
sends half a header line, or a body a byte at a time, holds its connection (and its slot) for as
long as it likes. `DeadlineProtocol` gives every request `header_timeout_s` from the connection
(or the previous response) to its last header line and `body_timeout_s` from there to the end of
its body, and closes the connection when either passes. uvicorn answers 503 beyond
`limit_concurrency` connections.

On SIGTERM uvicorn shuts down gracefully, restores the handler it found, and raises the signal again:
with Python's default handler the process would die there and skip `atexit`, leaving patient files in
the temp folder. `serve` installs a handler that turns the re-raised SIGTERM into SystemExit, so its
`finally` removes the folder.
"""
from __future__ import annotations

import logging
import signal
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.viewer.limits import Limits

log = logging.getLogger(__name__)


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers and another for its body."""

    header_timeout_s = 10.0
    body_timeout_s = 120.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._cycle_seen = None
        self._arm(self.header_timeout_s)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()   # the app, if it is reading the body, sees a disconnect

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if cycle is not self._cycle_seen:   # a request's headers have just arrived
            self._cycle_seen = cycle
            if cycle.more_body:
                self._arm(self.body_timeout_s)
            else:
                self._disarm()
        elif not cycle.more_body and self._deadline is not None and not cycle.response_complete:
            self._disarm()   # its body is complete: the app may take as long as the analysis takes

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s)   # for the next request (a pipelined one re-arms below)
        super().on_response_complete()

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with(limits: Limits) -> type[DeadlineProtocol]:
    return type("ViewerProtocol", (DeadlineProtocol,), {"header_timeout_s": limits.header_timeout_s,
                                                        "body_timeout_s": limits.body_timeout_s})


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def serve(app, host: str, port: int, limits: Limits, cleanup) -> None:
    """Run uvicorn until SIGTERM/SIGINT; `cleanup()` runs on the way out, whatever ended the run."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning",
        access_log=False,             # request lines would carry nothing identifying, but there is no need
        proxy_headers=False,          # the gate believes X-Forwarded-* from CXR_TRUSTED_PROXIES only
        server_header=False, limit_concurrency=limits.max_connections, timeout_keep_alive=5,
        http=protocol_with(limits))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        cleanup()
        signal.signal(signal.SIGTERM, previous)
    log.info("viewer stopped")
    sys.exit(0)
