"""Transient storage errors (a connection reset, a timeout, throttling, a 5xx) are retried with backoff; anything
else (a missing file, a refused permission, bytes really missing from a tar) is not, since another try would find
the same. Past its retries a transient error stops the run rather than becoming a row: what was written stays,
and the next run reads again what could not be read."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 5
FIRST_WAIT_S = 0.5  # then doubled each time, with jitter: 0.5, 1, 2, 4 s
TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EAGAIN})
# what object-store clients (botocore, aiohttp, google-cloud) say of errors that pass
TRANSIENT_WORDS = ("slowdown", "slow down", "throttl", "too many requests", "requesttimeout", "request timeout",
                   "serviceunavailable", "service unavailable", "internalerror", "internal error", "bad gateway",
                   "gateway timeout", "connection reset", "connection aborted", "timed out", "temporarily unavailable",
                   "server disconnected", "incomplete read", "(500)", "(502)", "(503)", "(504)", " 500 ", " 502 ",
                   # aiohttp (s3fs, gcsfs) when the connection closes before the body's declared length
                   "clientpayloaderror", "payload is not completed", "not enough data to satisfy content length",
                   " 503 ", " 504 ",
                   "transientioerror")  # ours, as a Ray task's error names it


class TransientIOError(Exception):
    """A read or write that kept failing for a reason that may pass. Deliberately not an OSError: the readers
    turn OSErrors into rows (a damaged shard), and this one must stop the run instead."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is one that another try may not meet."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TransientIOError, ConnectionError, TimeoutError)):
            return True
        if isinstance(current, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True
        message = f" {type(current).__name__}: {current} ".lower()
        if any(word in message for word in TRANSIENT_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def backoff(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1` (0-based)."""
    return FIRST_WAIT_S * 2**attempt * random.uniform(0.5, 1.5)


def retrying(action: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """`action()`, tried again after a transient error, at most `attempts` times in all; past them, a
    TransientIOError naming `what`. Other errors are raised as they are."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise TransientIOError(f"{what} failed {attempts} times: {type(exc).__name__}: {exc}") from exc
            wait = backoff(attempt)
            log.warning("%s failed (%s: %s); trying again in %.1f s", what, type(exc).__name__, exc, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
