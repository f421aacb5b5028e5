"""Connections that cannot be held open for free: uvicorn closes idle keep-alive connections,
but waits forever for the headers of a request that arrives a byte at a time (slowloris).
Here a request's headers must all arrive within a deadline, counted from when the connection
opened or its previous response ended. (The body's deadline is the app's: AuthAndCount.)"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools when installed, else h11

logger = logging.getLogger(__name__)


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol with a deadline on each request's headers (`http=` of its Config)."""

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._wait_for_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._stop_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._in_request():  # (a pipelined request may have started already)
                self._wait_for_headers()

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _wait_for_headers(self) -> None:
            self._stop_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_late)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                logger.debug("closing a connection whose request headers did not arrive in %.0f s", timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol
