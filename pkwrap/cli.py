"""The one error path of pkwrap's command-line programs (``scripts/``).

A program defines ``main(argv=None)`` and decorates it::

    from pkwrap.cli import program

    @program("copy-tree")
    def main(argv=None):
        ...                 # raise on any problem; return an exit status or None

    if __name__ == "__main__":
        sys.exit(main())

The decorated ``main`` lets argparse's own exits and explicit ``sys.exit`` through and
turns every other exception into ``SystemExit("<prog>: <message>")``: Python prints that
one line on stderr and exits with status 1. The message comes from :func:`describe_error`
(a file name and the problem: ``OSError`` -> ``<path>: <strerror>``, a decode error ->
``<file>: not UTF-8 text ...``; library errors such as :class:`~pkwrap.kaldi.io.
KaldiFormatError` already name their file). Other cases:

- a failure (an exception, or ``main`` returning a non-zero status: Kaldi's "nothing was
  done") leaves no output: temporaries of :class:`~pkwrap.kaldi.io.AtomicFile` outputs
  still open are removed, and so are the files committed during this run (a resumable
  program, ``resumable=True``, such as ``pkwrap-chain-train``, keeps the files it
  completed: each is whole, and they are what a rerun continues from);
- SIGTERM unwinds like an error (temporaries removed): exit status 1, one line;
- Python warnings are printed as one ``WARNING (<prog>): ...`` line each;
- ``KeyboardInterrupt`` -> exit status 130, one line;
- a closed stdout (``... | head``, ``BrokenPipeError``) -> exit status 141, no message;
- ``--verbose`` on the command line (removed before ``main`` sees it, unless ``main``'s
  parser is given it too) or ``PKWRAP_VERBOSE=1`` in the environment -> the traceback is
  printed before the one line.

Library code that knows which file a low-level error belongs to wraps it with
:func:`file_error` so the message names that file.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import traceback
import warnings
from typing import Callable, List, Optional

__all__ = ["program", "run_program", "describe_error", "file_error", "FileError"]

_VERBOSE_ENV = "PKWRAP_VERBOSE"


class FileError(OSError):
    """A problem with one named file (``str()`` is ``"<file>: <problem>"``).

    An ``OSError`` so that callers catching I/O errors catch it too."""

    def __init__(self, path, problem: str, errno_: int = 0):
        super().__init__(errno_, problem, os.fspath(path) if path is not None else None)
        self.path = self.filename
        self.problem = problem

    def __str__(self) -> str:
        return "%s: %s" % (self.path, self.problem) if self.path else self.problem


def file_error(path, exc: BaseException) -> FileError:
    """``exc`` (raised while reading or writing ``path``) as a :class:`FileError` naming
    ``path``; use ``raise file_error(path, e) from e``."""
    if isinstance(exc, FileError) and exc.path:
        return exc
    if isinstance(exc, UnicodeDecodeError):
        return FileError(path, "not UTF-8 text (byte 0x%02x at offset %d)"
                         % (exc.object[exc.start], exc.start))
    if isinstance(exc, OSError):
        return FileError(path, exc.strerror or str(exc), exc.errno or 0)
    return FileError(path, str(exc))


def describe_error(exc: BaseException) -> str:
    """One line: what went wrong, naming the file where the exception knows it."""
    if isinstance(exc, FileError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "input is not UTF-8 text (byte 0x%02x at offset %d)" % (
            exc.object[exc.start], exc.start)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or exc.__class__.__name__
        if exc.filename is not None and exc.filename2 is not None:
            return "%s -> %s: %s" % (exc.filename, exc.filename2, what)
        if exc.filename is not None:
            return "%s: %s" % (exc.filename, what)
        return what
    if isinstance(exc, MemoryError):
        return "out of memory"
    msg = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    if "\n" in msg:  # one line (a C++ library's message may span several)
        msg = " ".join(ln.strip() for ln in msg.splitlines() if ln.strip())
    if isinstance(exc, (ValueError, RuntimeError, KeyError, EOFError)):
        return msg
    # not one of the errors the library raises for bad input: say what it is
    return "internal error: %s: %s (rerun with --verbose for the traceback)" % (
        exc.__class__.__name__, msg)


def _verbose_requested(argv: List[str]) -> bool:
    return any(a == "--verbose" or (a.startswith("--verbose=") and a[10:] not in ("0", ""))
               for a in argv)


def run_program(main: Callable, prog: str, argv: Optional[List[str]] = None,
                keep_verbose: bool = False, resumable: bool = False):
    """Call ``main(argv)`` under the one error path (see the module docstring).

    Args:
      main: ``main(argv) -> exit status or None``.
      prog: the program's name for messages.
      argv: the arguments (default ``sys.argv[1:]``).
      keep_verbose: pass ``--verbose`` on to ``main`` (its parser defines it).
      resumable: on failure, keep the outputs committed so far (a training program's
        finished stages and checkpoints); temporaries are still removed.
    Returns:
      what ``main`` returned.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(argv) or os.environ.get(_VERBOSE_ENV, "") not in ("", "0")
    if not keep_verbose:
        argv = [a for a in argv if a != "--verbose" and not a.startswith("--verbose=")]
    from pkwrap.kaldi import io as kio
    first_output = kio.num_committed_outputs() if not resumable else None
    old_term = _catch_sigterm()
    old_show = warnings.showwarning
    warnings.showwarning = _one_line_warning(prog)
    old_last_resort = _one_line_log_handler(prog)
    try:
        rc = main(argv)
        if rc not in (None, 0):
            _remove_outputs(kio, first_output, prog)
        return rc
    except SystemExit as e:
        if e.code not in (None, 0):
            _remove_outputs(kio, first_output, prog)
        raise
    except KeyboardInterrupt:
        _remove_outputs(kio, first_output, prog)
        raise SystemExit(130) from None
    except _Terminated:
        _remove_outputs(kio, first_output, prog)
        raise SystemExit("%s: terminated (SIGTERM)" % prog) from None
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, as SIGPIPE would
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise SystemExit(141) from None
    except BaseException as e:  # noqa: B902 - every failure leaves through here
        _remove_outputs(kio, first_output, prog)
        if isinstance(e, OSError) and e.errno == errno.EPIPE:
            raise SystemExit(141) from None
        if verbose:
            traceback.print_exc()
        raise SystemExit("%s: %s" % (prog, describe_error(e))) from None
    finally:
        warnings.showwarning = old_show
        logging.lastResort = old_last_resort
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _one_line_warning(prog: str):
    """Python warnings as Kaldi prints its own: one ``WARNING (prog): ...`` line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print("WARNING (%s): %s" % (prog, " ".join(str(message).split())),
              file=file or sys.stderr)
    return show


def _one_line_log_handler(prog: str):
    """Library warnings (``logging``) that reach no handler are printed as one
    ``WARNING (prog): ...`` line each, as Kaldi prints its own: this replaces logging's
    last-resort handler, so a program that configures logging itself (``basicConfig``) is
    not affected. Returns the previous last-resort handler (restore it afterwards)."""
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(logging.WARNING)

    class _Fmt(logging.Formatter):
        def format(self, record):
            return "%s (%s): %s" % (record.levelname, prog,
                                    " ".join(record.getMessage().split()))
    h.setFormatter(_Fmt())
    old = logging.lastResort
    logging.lastResort = h
    return old


class _Terminated(BaseException):
    """SIGTERM arrived: unwind (outputs are discarded) and exit."""


def _catch_sigterm():
    """SIGTERM (a job scheduler's kill, ``timeout``) unwinds the program like an error,
    so that its temporary outputs are removed; returns the previous handler (None when
    not in the main thread)."""
    def handler(signum, frame):
        raise _Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _remove_outputs(kio, first: Optional[int], prog: str) -> None:
    """A failed program leaves no output: temporaries still open are removed, and so are
    the files it committed before it failed (a program that reports failure, e.g. Kaldi's
    "nothing was done" exit status 1, must not leave an empty or partial archive), unless
    ``first`` is None (a resumable program: what it completed stays)."""
    kio.discard_open_outputs()
    if first is not None:
        kio.remove_committed_outputs(first)


def program(prog: str, keep_verbose: bool = False):
    """Decorator: ``main(argv=None)`` runs under :func:`run_program` as ``prog``."""
    def deco(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            return run_program(main, prog, argv, keep_verbose)
        return wrapper
    return deco
