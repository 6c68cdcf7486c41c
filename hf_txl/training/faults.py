"""What long runs on shared machines and clusters meet: a full disk, preemption, two runs on one directory.

* ``OutputDirLock``: one run per ``--output_dir`` (an advisory ``flock`` on ``<output_dir>/.hf_txl.lock``, held by the
  main process while it runs; the kernel releases it when the process ends, however it ends, so a dead run leaves no
  live lock). The file names the holder (pid, host, start, command) for the refusal message.
* ``StopRequest``: SIGTERM (what SLURM, Kubernetes and spot instances send before killing a job) and SIGUSR1 (what
  SLURM's ``--signal`` sends ahead of the time limit) set a flag; the training loop checks it after every optimizer
  step (every process agrees: the flags are summed across processes), writes a checkpoint and exits with
  ``EXIT_PREEMPTED``.
* ``write_error_message`` / ``check_free_space``: a checkpoint or export that cannot be written (no space, a quota, any
  write error) becomes one line naming the device, what was needed and what to do; the partial files are removed by
  the caller, and everything written before is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

#: Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: try again later).
EXIT_PREEMPTED = 75
LOCK_FILE = ".hf_txl.lock"
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ----------------------------------------------------------------------------------------------------
# One run per output directory
# ----------------------------------------------------------------------------------------------------


class OutputDirInUse(Exception):
    """Another live run holds the output directory's lock."""


class OutputDirLock:
    """An exclusive, non-blocking ``flock`` on ``<output_dir>/.hf_txl.lock`` (``acquire`` / ``release``)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``OutputDirInUse`` naming the running process. A lock file left by a process
        that has ended (killed, crashed) is not locked any more and is simply taken over."""
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirInUse(
                f"{self.output_dir} is in use by another training run ({holder}); wait for it to end or choose "
                "another --output_dir (--overwrite_output_dir does not take a directory from a running run)."
            ) from None
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (the file stays, emptied: the next run takes it without a question)."""
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except ValueError:
        record = {}
    if not record:
        return "a process that has not written its name yet"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: {record.get('command')}"


# ----------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM and SIGUSR1 ask the run to stop after the current optimizer step (``install`` / ``uninstall``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, accelerator) -> bool:
        """True when any process received a stop signal (a collective call: every process must make it)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal"


# ----------------------------------------------------------------------------------------------------
# Write errors and free space
# ----------------------------------------------------------------------------------------------------


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes on the device holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(size: int) -> str:
    """A size for a message: KiB below 1 MiB, MiB below 1 GiB, else GiB."""
    if size < 2**20:
        return f"{size / 2**10:,.0f} KiB"
    return f"{size / 2**20:,.1f} MiB" if size < 2**30 else f"{size / 2**30:,.2f} GiB"


def out_of_space(error: BaseException) -> bool:
    """An error that says the device is full: an OSError with ENOSPC / EDQUOT / EFBIG, or the same reported in the
    text of torch's zip writer ('unexpected pos', 'failed writing file') or of safetensors ('StorageFull')."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in _OUT_OF_SPACE:
            return True
    text = str(error)
    return any(s in text for s in ("No space left", "StorageFull", "Disk quota", "unexpected pos", "failed writing"))


def first_failure(accelerator, failure: str | None) -> str | None:
    """The first failure message of any process, on every process (a collective call when there are several):
    so that all of them stop together, none left waiting at the next barrier."""
    failures = [failure]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failures = gather_object([failure])
    return next((f for f in failures if f), None)


def write_error_message(what: str, target: Path, error: BaseException, *, needed: int | None = None) -> str:
    """One line for a failed write of ``what`` (e.g. 'checkpoint step_00000040') under ``target``."""
    free = free_bytes(target)
    keep = "Everything saved before is intact; free space there (or choose another --output_dir) and resume with " \
        "--resume_from_checkpoint latest."  # fmt: skip
    if out_of_space(error) or (needed is not None and free < needed):
        need = f"about {_mib(needed)} needed, " if needed else ""
        return f"no space left on the device holding {target} while writing {what} ({need}{_mib(free)} free). {keep}"
    return f"could not write {what} to {target}: {type(error).__name__}: {str(error).splitlines()[0]}. {keep}"


def check_free_space(what: str, target: Path, needed: int, margin: float = 1.05) -> str | None:
    """None when the device holding ``target`` has ``needed`` bytes (times ``margin``) free, else the message."""
    if free_bytes(target) >= needed * margin:
        return None
    full = OSError(errno.ENOSPC, "not enough free space")
    return write_error_message(what, target, full, needed=int(needed * margin))
