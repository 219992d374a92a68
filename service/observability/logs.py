"""Log lines: one format for everything the server writes (``log_format``: json or text),
uvicorn's own lines included, and the access log written off the event loop.

* ``configure(settings)`` (``actserve serve``): one stderr handler on the root logger with
  ``LineFormatter``; uvicorn runs with ``log_config=None``, so its loggers propagate here.
* ``AccessLog``: the request path hands each line (a dict) to a bounded queue, which costs
  the event loop one ``put``; a writer thread formats the lines and emits them in batches,
  one log record (and one write) per batch, through the ``actserve.access`` logger. ``close``
  writes every queued line before it returns (the app's shutdown calls it after the drain,
  so SIGTERM loses no line). When the queue is full (``max_pending`` lines: a log sink far
  slower than the server), lines are dropped and counted, never waited for.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time

import orjson

from service.settings import Settings

ACCESS_LOGGER = "actserve.access"
FLUSH_INTERVAL_S = 0.02  # the writer emits at most this often: lines arrive in batches


def format_access(line: dict, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(line).decode()
    head = (f"{line.get('id')} {line.get('method')} {line.get('path')} {line.get('status')} "
            f"{line.get('ms')}ms")
    rest = " ".join(f"{k}={_text(v)}" for k, v in line.items()
                    if k not in ("id", "method", "path", "status", "ms"))
    return f"{head} {rest}" if rest else head


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class LineFormatter(logging.Formatter):
    """json: ``{"ts", "level", "logger", "message"[, "exc"]}`` a line; text: ``ts LEVEL
    logger: message``. Access-log records already hold their formatted lines."""

    def __init__(self, fmt: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER:
            return record.getMessage()
        if self.kind == "text":
            return super().format(record)
        out = {"ts": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()

    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 - logging's name
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def configure(settings: Settings, stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter(settings.log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler


class AccessLog:
    def __init__(self, fmt: str = "json", max_pending: int = 20_000) -> None:
        self.fmt = fmt
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._thread: threading.Thread | None = None
        self._closed = False

    def enabled(self) -> bool:
        return not self._closed and self._logger.isEnabledFor(logging.INFO)

    def write(self, line: dict) -> None:
        """Event loop: queue one line (a dict the caller no longer changes)."""
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put(line)

    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="actserve-access-log",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued line, then stop the writer."""
        self._closed = True
        if self._thread is None:
            self._emit(self._take_all())
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self.dropped:
            logging.getLogger("actserve").warning(
                "access log: %d lines dropped (the log sink was slower than the server)",
                self.dropped)

    def _take_all(self) -> list:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first, *self._take_all()]
            lines = [item for item in batch if item is not None]
            self._emit(lines)
            if len(lines) != len(batch):  # close() asked: everything before it is written
                self._emit([item for item in self._take_all() if item is not None])
                return
            time.sleep(FLUSH_INTERVAL_S)  # let the next batch gather

    def _emit(self, lines: list) -> None:
        if not lines:
            return
        text = "\n".join(format_access(line, self.fmt) for line in lines)
        self._logger.info("%s", text)
        self.written += len(lines)
