"""What the command lines (`python -m export`, `python -m refit`, `python -m engines.triton`) share.

Exit codes: 0 done, 2 bad usage or input, 1 a failure while working, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@contextlib.contextmanager
def sigterm_exits():
    """While inside, SIGTERM raises SystemExit(143) instead of killing the process, so `finally`
    and `except BaseException` blocks run (temporary directories are removed, servers stopped).
    The previous handler is restored on leaving (main() may be called in-process, e.g. by tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
