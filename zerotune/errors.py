"""One error type for bad input, one for failures during a run.

Every reader, loader and verb raises :class:`ZerotuneError` with a message that names
the file or key and the problem. ``zerotune.cli`` turns it into one line on stderr and
exit code 2 (or the error's own ``exit_code``); ``--debug`` shows the traceback.
"""

from __future__ import annotations


class ZerotuneError(Exception):
    """Bad input (config, data, checkpoint, arguments): one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class RunFailed(ZerotuneError):
    """A failure during a run (diverged, out of memory); the last good checkpoint is kept."""

    exit_code = 1


class Interrupted(ZerotuneError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint (exit 130 or 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DistributedError(ZerotuneError):
    """A process of a multi-process run could not join or lost contact with the others (exit 1),
    or its launch environment is wrong (exit 2).

    Unlike other errors (which rank 0 reports for everyone), every process prints this one.
    """

    def __init__(self, message: str, *, path: object | None = None, exit_code: int = 1) -> None:
        super().__init__(message, path=path)
        self.exit_code = exit_code
