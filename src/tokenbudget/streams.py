"""Meters that watch a response's server-sent events and settle its ticket exactly once when the stream ends.

A meter is attached to the SDK's HTTP response object, because every path that reads a body -- ``create``,
``stream=True``, ``messages.stream()``, ``with_raw_response``, ``with_streaming_response`` -- reads it from
that one object. It settles on the first of: the events running out, the response being closed, or the response
being garbage collected. The per-event work is a substring test; JSON is parsed only for the events that carry
usage, the received text is counted only when a stream is cut short, and the answer is rebuilt from the kept events
only when the user opted in to ``capture_content``.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .calls import Usage

if TYPE_CHECKING:
    from .guard import Ticket

__all__ = ["BodyMeter", "StreamMeter", "attach", "capture_output", "meter_of"]

log = logging.getLogger("tokenbudget")

_ATTR = "_tokenbudget_meter"


class StreamMeter:
    """Base class for one protocol's SSE stream; subclasses implement :meth:`observe` and :meth:`_usage`."""

    def __init__(self, ticket: Ticket, *, hide_usage_chunk: bool = False) -> None:
        self.ticket = ticket
        self.hide_usage_chunk = hide_usage_chunk
        self.chunks: list[str] = []
        self.error: BaseException | None = None
        self._done = False
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def observe(self, data: str, event: str | None) -> bool:  # pragma: no cover - abstract
        """Look at one event; return False to hide it from the caller."""
        raise NotImplementedError

    def _usage(self) -> Usage:  # pragma: no cover - abstract
        """Usage as the vendor reported it, or counted from what arrived when the stream was cut short."""
        raise NotImplementedError

    def _output(self) -> Any:
        """What the model answered, rebuilt from the events seen, in the shape the API gives it unstreamed (asked
        for only with ``capture_content``, when the stream ends: the per-event work stays a substring test)."""
        return None

    def _final_usage(self) -> Usage | None:
        """The usage to settle with, or None if this meter already settled (idempotent)."""
        with self._lock:
            if self._done:
                return None
            self._done = True
        if self._finalizer is not None:
            self._finalizer.detach()
        capture_output(self.ticket, self._output)
        try:
            return self._usage()
        except Exception as exc:  # a malformed stream must still settle
            self.error = self.error or exc
            return Usage(input_tokens=self.ticket.input_tokens, exact=False)

    def finish(self) -> None:
        """Settle the ticket (idempotent): vendor usage if the stream got that far, else input + text received."""
        usage = self._final_usage()
        if usage is None:
            return
        if usage.exact:
            self.ticket.ok(usage)
        else:
            self.ticket.abandoned(self.error, usage)

    async def afinish(self) -> None:
        """As :meth:`finish`, awaiting the ledger, for a stream that ended normally in async code."""
        usage = self._final_usage()
        if usage is None:
            return
        if usage.exact:
            await self.ticket.aok(usage)
        else:
            await self.ticket.aabandoned(self.error, usage)

    def tee(self, events: Iterator[Any]) -> Iterator[Any]:
        try:
            for sse in events:
                if self.observe(sse.data, sse.event):
                    yield sse
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.finish()

    async def atee(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for sse in events:
                if self.observe(sse.data, sse.event):
                    yield sse
        except BaseException as exc:  # incl. GeneratorExit and cancellation: settle without awaiting
            self.error = exc
            self.finish()
            raise
        await self.afinish()

    def count_text(self, text: str) -> int:
        return self.ticket.guard.estimator.text_tokens(self.ticket.request.model, text) if text else 0


class BodyMeter(StreamMeter):
    """A non-SSE body the caller reads later (``with_streaming_response``): parse it when the response closes."""

    def __init__(
        self, ticket: Ticket, response: Any, parse: Callable[[Any], Usage | None], output: Callable[[Any], Any]
    ) -> None:
        super().__init__(ticket)
        self._response = weakref.ref(response)
        self._parse = parse
        self._extract = output
        self.reading = False

    def finish(self) -> None:
        # httpx closes the response inside read(), before the body is stored: settle when read() returns.
        if not self.reading:
            super().finish()

    def observe(self, data: str, event: str | None) -> bool:
        return True

    def _body(self) -> Any:
        response = self._response()
        content = getattr(response, "_content", None) if response is not None else None
        return json.loads(content) if content else None

    def _usage(self) -> Usage:
        body = self._body()
        if body is not None:
            usage = self._parse(body)
            if usage is not None:
                return usage
        return Usage(input_tokens=self.ticket.input_tokens, exact=False)

    def _output(self) -> Any:
        body = self._body()
        return self._extract(body) if body is not None else None


def capture_output(ticket: Ticket, read: Callable[[], Any]) -> None:
    """With ``capture_content`` on, keep what the model answered (``read()``) for the call's span. Reading it is best
    effort: an answer in a shape we do not know leaves the attribute off, it never fails or changes the settlement."""
    if not ticket.capture_content:
        return
    try:
        ticket.output = read()
    except Exception:
        log.debug("tokenbudget could not read the answer's content for the span", exc_info=True)


def meter_of(response: Any) -> StreamMeter | None:
    try:
        return response.__dict__.get(_ATTR)  # type: ignore[no-any-return]
    except AttributeError:
        return None


def attach(response: Any, meter: StreamMeter, *, is_async: bool) -> None:
    """Hang ``meter`` on the HTTP response and settle it when the response is closed or collected.

    ``close``/``aclose`` are shadowed on this one instance only; no library class is patched for it.
    """
    try:
        response.__dict__[_ATTR] = meter
    except AttributeError:  # pragma: no cover - a response type without __dict__: settle at collection only
        pass
    if isinstance(meter, BodyMeter):
        _settle_after_read(response, meter, is_async=is_async)
    if is_async:
        original_aclose = response.aclose

        async def aclose() -> None:
            try:
                await original_aclose()
            except BaseException:
                meter.finish()
                raise
            await meter.afinish()

        response.aclose = aclose
    else:
        original_close = response.close

        def close() -> None:
            try:
                original_close()
            finally:
                meter.finish()

        response.close = close
    meter._finalizer = weakref.finalize(response, meter.finish)


def _settle_after_read(response: Any, meter: BodyMeter, *, is_async: bool) -> None:
    if is_async:
        original_aread = response.aread

        async def aread() -> bytes:
            meter.reading = True
            try:
                return await original_aread()  # type: ignore[no-any-return]
            finally:
                meter.reading = False
                meter.finish()

        response.aread = aread
    else:
        original_read = response.read

        def read() -> bytes:
            meter.reading = True
            try:
                return original_read()  # type: ignore[no-any-return]
            finally:
                meter.reading = False
                meter.finish()

        response.read = read
