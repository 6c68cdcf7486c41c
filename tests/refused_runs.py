"""Run ``hf_txl.training.train.main`` on several argument lists that it must refuse, one after another in this one
process, and print one JSON list: each run's exit status and what it wrote to stderr.

    python tests/refused_runs.py '[["--preset", "tiny", "--tgt_len", "0"], ...]'

A refused run's time is almost all the interpreter's start-up (torch, transformers, accelerate): twenty of them in
one process take the time of one. Each run starts from a fresh Accelerate state; an exception other than
``SystemExit`` is printed with its traceback, as the interpreter would print it.
"""

import contextlib
import io
import json
import sys
import traceback

from accelerate.state import AcceleratorState

from hf_txl.training.train import main


def refused_run(argv: list[str]) -> dict:
    stderr = io.StringIO()
    returncode = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit_:
            returncode = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported as the interpreter would report it
            traceback.print_exc()
            returncode = 1
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"returncode": returncode, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    print(json.dumps([refused_run(argv) for argv in json.loads(sys.argv[1])]))
