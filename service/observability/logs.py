"""Log lines: one format for everything the server writes (``log_format``: json or text),
uvicorn's own lines included, and the access log written off the event loop.

* ``configure(settings)`` (``actserve serve``): one stderr handler on the root logger with
  ``LineFormatter``; uvicorn runs with ``log_config=None``, so its loggers propagate here.
  Python warnings go through logging (``logging.captureWarnings``). In json mode, what
  libraries write straight to file descriptor 2 (torch's C++ warnings, the profiler's own
  lines, gRPC's core) is captured too (``Fd2Capture``): fd 2 becomes a pipe whose lines a
  thread emits as records of the ``stderr`` logger, so every line the server writes is one
  JSON object (a line that already is one, from a worker process, passes through as it is).
* ``AccessLog``: the request path hands each line (a dict) to a bounded queue, which costs
  the event loop one ``put``; a writer thread formats the lines and emits them in batches:
  under ``actserve serve`` one write of bytes to stderr per batch (``configure`` installs
  that sink), elsewhere (an app embedded in a test or another program) one record per batch
  through the ``actserve.access`` logger. ``close``
  writes every queued line before it returns (the app's shutdown calls it after the drain,
  so SIGTERM loses no line). When the queue is full (``max_pending`` lines: a log sink far
  slower than the server), lines are dropped and counted, never waited for.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import orjson

from service.settings import Settings

ACCESS_LOGGER = "actserve.access"
FLUSH_INTERVAL_S = 0.1  # the writer emits at most this often: each wake-up of a thread costs
# far more than a line (measured: 12 us a line at 20 ms, 5 us at 100 ms, ~1,300 lines/s)


def format_access(line: dict, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(line).decode()
    return _text_line(line)


def format_batch(lines: list[dict], fmt: str) -> bytes:
    """The lines, each ending in a newline."""
    if fmt == "json":
        return b"".join([orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE) for line in lines])
    return "".join([_text_line(line) + "\n" for line in lines]).encode()


def _text_line(line: dict) -> str:
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


_SINK: list = [None]  # where AccessLog writes by default (None: the actserve.access logger)


def stream_sink(stream) -> Callable[[bytes], None]:
    """A binary stream: one write and one flush per batch."""
    lock = threading.Lock()

    def write(data: bytes) -> None:
        with lock:
            stream.write(data)
            stream.flush()

    return write


def configure(settings: Settings, stream=None) -> logging.Handler:
    """``actserve serve``: every line to ``stream`` (stderr) in ``settings.log_format``."""
    if stream is None and settings.log_format == "json":
        stream = Fd2Capture.install()
    stream = stream or sys.stderr
    binary = getattr(stream, "buffer", None)
    if binary is not None:
        stream.flush()
        _SINK[0] = stream_sink(binary)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(settings.log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> this handler
    return handler


class Fd2Capture:
    """File descriptor 2 turned into a pipe read by a daemon thread, each line re-emitted
    through the ``stderr`` logger (as a warning), so that C and C++ code writing to fd 2
    cannot break the one-JSON-object-a-line format. ``install`` returns a text stream on
    the original stderr for the log handler itself. At exit the pipe is closed and drained
    (the interpreter's last message, such as a ``SystemExit`` text, is not lost)."""

    _installed: Fd2Capture | None = None

    def __init__(self) -> None:
        sys.stderr.flush()
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.reader = os.fdopen(read, "rb", buffering=0)
        self.log = logging.getLogger("stderr")
        self.thread = threading.Thread(target=self._run, daemon=True, name="actserve-fd2")
        self.thread.start()
        self.stream = os.fdopen(os.dup(self.original), "w", buffering=1, encoding="utf-8",
                                errors="backslashreplace")
        atexit.register(self.close)

    @classmethod
    def install(cls):
        if cls._installed is None:
            # a handler that cannot write (the original stderr closed) must not print its
            # traceback to fd 2, which is this pipe: that would feed the failure back to it
            logging.raiseExceptions = False
            cls._installed = cls()
        return cls._installed.stream

    def _run(self) -> None:
        """Reads until every writer is gone, whatever happens to what it writes: a thread
        that stopped reading would leave the pipe full and every later write to fd 2 (a log
        line) blocked for ever, for instance once the parent holding the original stderr
        was killed."""
        pending = b""
        while True:
            chunk = self.reader.read(65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            try:
                self._emit(lines)
            except Exception:  # noqa: BLE001 - the lines are lost, the pipe keeps draining
                pass
        if pending:
            try:
                self._emit([pending])
            except Exception:  # noqa: BLE001
                pass

    def _emit(self, lines: list[bytes]) -> None:
        """Lines that already are JSON objects (a worker process's log and access lines,
        which come through here) pass through in one write, unparsed; others are wrapped."""
        through = []
        for raw in lines:
            raw = raw.rstrip(b"\r")
            if raw.startswith(b"{") and raw.endswith(b"}"):
                through.append(raw + b"\n")
            elif raw.strip():
                if through:
                    self._write(b"".join(through))
                    through = []
                self.log.warning("%s", raw.decode("utf-8", errors="backslashreplace"))
        if through:
            self._write(b"".join(through))

    def _write(self, data: bytes) -> None:
        self.stream.flush()
        self.stream.buffer.write(data)
        self.stream.buffer.flush()

    def close(self) -> None:
        """Point fd 2 back at the original stderr and drain what the pipe still holds."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.original, 2)  # the pipe's last writer is gone: the reader sees its end
        self.thread.join(2.0)


class AccessLog:
    def __init__(self, fmt: str = "json", max_pending: int = 20_000,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.fmt = fmt
        self.max_pending = max_pending
        self.sink = sink or _SINK[0]
        self.dropped = 0
        self.written = 0
        self._queued = 0  # counted by the event loop only
        self._taken = 0  # counted by the writer only: queued - taken is what waits
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._thread: threading.Thread | None = None
        self._enabled = False

    def enabled(self) -> bool:
        """Whether lines are wanted (decided at ``start``: the level does not change)."""
        return self._enabled

    def write(self, line: dict) -> None:
        """Event loop: queue one line (a dict the caller no longer changes)."""
        if self._queued - self._taken >= self.max_pending:
            self.dropped += 1
            return
        self._queued += 1
        self._queue.put(line)

    def start(self) -> None:
        self._enabled = self._logger.isEnabledFor(logging.INFO)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="actserve-access-log",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued line, then stop the writer."""
        self._enabled = False
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
        get = self._queue.get_nowait
        try:
            while True:
                items.append(get())
        except queue.Empty:
            self._taken += len(items)
            return items

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            self._taken += 1
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
        data = format_batch(lines, self.fmt)
        if self.sink is not None:
            self.sink(data)
        else:
            self._logger.info("%s", data.decode().rstrip("\n"))
        self.written += len(lines)
