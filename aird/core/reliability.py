"""What keeps a long run's work safe: one run per output folder (a lock), SIGTERM handled like Ctrl-C, the scratch
of killed runs cleaned up, output folders checked before any model loads, a model's identity taken from its
content (not its path), and a crash log for the bugs that are aird's, not the user's.

docs/reliability.md lists every case with the test that shows it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from aird.core.errors import AirdError

LOCK_NAME = ".aird.lock"


class Terminated(BaseException):
    """SIGTERM arrived (timeout, a scheduler, docker stop): unwinds like Ctrl-C, so every write finishes or is
    rolled back by its own ``finally``. A BaseException so that no ``except Exception`` swallows it."""


class OutputLocked(AirdError):
    pass


# ---- SIGTERM ----------------------------------------------------------------------------------------------
@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` in the main thread (the previous handler and
    ``sys.unraisablehook`` are restored).

    Python runs a signal handler wherever the main thread is, also inside a ``__del__`` or a weakref callback
    (freeing vLLM's engine after an evaluation runs many), and an exception raised there is not propagated: it
    goes to ``sys.unraisablehook`` and the run goes on. So a :class:`Terminated` that ends there has SIGTERM sent
    again a moment later, from a thread (sent from the hook itself, its handler would run inside the hook, where
    an exception is ignored too), to be raised where an exception unwinds the run."""
    def _raise(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_hook = sys.unraisablehook

    def _swallowed(unraisable) -> None:
        if unraisable.exc_type is Terminated:
            again = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = _swallowed
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


# ---- one run per output folder ----------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(folder: Path | str, beside: bool = False) -> Path:
    """The lock file of ``folder``: inside it, or (``beside``: a model folder, which is replaced as a whole by a
    rename) next to it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{LOCK_NAME}" if beside else folder / LOCK_NAME


@contextmanager
def out_lock(folder: Path | str, beside: bool = False, what: str = "--out", wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the block. A second aird on the same folder fails at once with
    the first one's process id and command (or, with ``wait``, waits its turn); the lock dies with its process
    (flock), so a killed run never leaves a folder locked."""
    folder = Path(folder)
    check_writable_folder(folder, what)
    path = lock_path(folder, beside)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        fh.close()
        who = f"process {holder.get('pid', '?')} ({holder.get('command', 'aird')})"
        raise OutputLocked(f"{folder} is in use by {who}; wait for it to finish or choose another {what}.") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": " ".join(["aird", *sys.argv[1:]])[:300],
                             "since": time.time()}))
        fh.flush()
        yield folder
    finally:
        if not wait:   # no lock file left behind (a waiting kind keeps its file: waiters hold it open)
            path.unlink(missing_ok=True)
        else:
            try:
                fh.seek(0)
                fh.truncate()
            except OSError:
                pass
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


# ---- scratch of killed runs -------------------------------------------------------------------------------
def scratch_prefix(kind: str) -> str:
    """The name prefix of this process's scratch folders: ``.aird-<kind>-<pid>-``."""
    return f".aird-{kind}-{os.getpid()}-"


def clean_stale_scratch(parent: Path | str, kind: str) -> list[Path]:
    """Remove ``.aird-<kind>-<pid>-*`` scratch in ``parent`` left by processes that are no longer alive (a run
    killed with SIGKILL cannot clean up after itself). Returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.glob(f".aird-{kind}-*"):
        parts = p.name.split("-")
        if len(parts) < 4 or not parts[2].isdigit():
            continue
        if int(parts[2]) != os.getpid() and not _pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---- output folders ---------------------------------------------------------------------------------------
def check_writable_folder(folder: Path | str, option: str = "--out") -> None:
    """Before any model loads: ``folder`` must be a folder (or not exist yet) that this user can write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AirdError(f"{option} {folder} is a file, not a folder; choose a folder.")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise AirdError(f"{option} {folder} cannot be created: {probe} is a file.")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise AirdError(f"{option} {folder} cannot be written: no write permission on {probe}.")


# ---- a model's identity -----------------------------------------------------------------------------------
def model_fingerprint(path: Path | str) -> str | None:
    """A short hash of a local model folder's content: config.json and, for every safetensors file, its size
    and its header (names, shapes, dtypes and byte offsets of every tensor) plus the first and last MiB of its
    data. Replacing the model in a folder (compress --force) changes it; loading the same model does not.
    None for a hub id."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(fh.read(min(n, 100_000_000)))
                h.update(fh.read(2**20))
                if size > 2**21:
                    fh.seek(-(2**20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def texts_fingerprint(texts) -> str:
    """A short hash of the prompts a run read: a data directory whose copy of a set changed is another input."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---- the crash log ----------------------------------------------------------------------------------------
def crash_log_dir() -> Path:
    """Where aird writes the traceback of an internal error: $AIRD_CRASH_DIR, else the cache folder."""
    from aird.core.env import cache_dir

    env = os.environ.get("AIRD_CRASH_DIR")
    return Path(env).expanduser() if env else cache_dir()


def write_crash_log(exc: BaseException) -> Path:
    """Append the traceback of ``exc`` with the command and versions to aird-crash.log; return its path."""
    from aird.core.env import versions

    folder = crash_log_dir()
    text = (f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} aird {' '.join(sys.argv[1:])}\n"
            f"versions: {json.dumps(versions())}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n")
    for where in (folder, Path.cwd(), Path("/tmp")):
        try:
            where.mkdir(parents=True, exist_ok=True)
            path = where / "aird-crash.log"
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text)
            return path
        except OSError:
            continue
    return Path("(nowhere: no folder could be written)")


_USER_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.ENOENT: "no such file or folder", errno.EISDIR: "it is a folder, not a file",
                errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EEXIST: "it already exists",
                errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.ENAMETOOLONG: "the name is too long"}


def user_error_sentence(exc: BaseException) -> str | None:
    """One sentence for an exception a user's environment or files cause (a path, a permission, the disk, a
    file's bytes); None for one that is a bug of aird's."""
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        what = exc.filename or "a file"
        return f"cannot use {what}: {_USER_ERRNOS[exc.errno]}; check the path and rerun."
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file aird read is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 and "
                "rerun.")
    return None
