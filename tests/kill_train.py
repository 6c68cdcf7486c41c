"""Run ``hf_txl.training.train`` and SIGKILL the process at a chosen point, to test that a killed run resumes exactly.

    HF_TXL_KILL_AT=after_step:N   python tests/kill_train.py ARGS   # once step N's log record is written
    HF_TXL_KILL_AT=during_save:N  python tests/kill_train.py ARGS   # checkpoint N written, not yet renamed into place

The production script has no such hook: this wrapper patches two library functions before calling ``main``.
"""

import os
import signal
import sys

from hf_txl.training import checkpointing, progress, train


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(where: str, step: int) -> None:
    if where == "after_step":
        write = progress.JsonLog.write

        def write_then_kill(self, record):
            write(self, record)
            if record.get("step") == step and "loss" in record:
                kill()

        progress.JsonLog.write = write_then_kill
    elif where == "during_save":
        write_manifest = checkpointing.write_manifest

        def kill_before_manifest(path):
            if path.name == f".tmp_step_{step:08d}":
                kill()
            write_manifest(path)

        checkpointing.write_manifest = kill_before_manifest
    else:
        raise SystemExit(f"HF_TXL_KILL_AT: unknown point {where!r} (after_step or during_save)")


if __name__ == "__main__":
    where, step = os.environ["HF_TXL_KILL_AT"].split(":")
    install(where, int(step))
    train.main(sys.argv[1:])
