"""The process a run lives in: glibc's allocator, native bf16, the CPU thread count (Accelerate pins a CPU-only
process to one thread) and FSDP on CPU processes. Set by the trainer, never by a model import.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch


@functools.cache
def keep_freed_memory_in_process() -> bool:
    """Tell glibc's allocator to keep freed blocks instead of returning them to the system (Linux only).

    By default glibc serves blocks above a (dynamic) threshold with ``mmap`` and trims the heap after frees, so every
    training or evaluation step of a small model pays page faults on fresh activation buffers; keeping them cuts
    the time of a small model's evaluation step by about a quarter and of its training step by about 6% on the CPU
    (``bench/bench_allocator.py``). The cost: the process keeps its peak heap. ``scripts/train.py`` and
    ``scripts/evaluate.py`` call this at start; the library itself never changes process settings.
    Returns whether the settings were applied.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (x86 AVX512-BF16 or AMX, ARM BF16), from
    ``/proc/cpuinfo``; None where that cannot be read. Without it, CPU bf16 autocast converts in software and is
    several times slower than fp32 (``bench/README.md``: 63 vs 341 GFLOP/s on the development VM)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# ----------------------------------------------------------------------------------------------------
# CPU threads
# ----------------------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads do not speed up matrix products)."""
    import psutil  # an Accelerate dependency

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    return max(1, min(physical, allowed))


def _launcher_process(max_depth: int = 4) -> int | None:
    """The pid of the ``accelerate launch`` process above this one (Linux ``/proc``), if any."""
    pid = os.getppid()
    for _ in range(max_depth):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if any(b"accelerate" in part for part in cmdline[:3]):
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
        if pid <= 1:
            return None
    return None


def accelerate_pinned_one_thread() -> bool:
    """Whether ``accelerate launch`` (not the user) set ``OMP_NUM_THREADS=1`` for this process.

    Without ``--cpu``, ``accelerate launch`` passes ``OMP_NUM_THREADS=1`` to its processes on a CPU-only machine
    unless told otherwise, which halves the training speed on 2 cores. It was the user's choice when the launcher
    itself was started with ``OMP_NUM_THREADS`` set or with ``--num_cpu_threads_per_process``; both are read from
    the launcher's ``/proc`` entries (its environment as it was started, and its command line).
    """
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return False
    launcher = _launcher_process()
    if launcher is None:
        return False
    try:
        environ = Path(f"/proc/{launcher}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{launcher}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    user_set_env = any(entry.startswith(b"OMP_NUM_THREADS=") for entry in environ)
    user_set_flag = any(part.startswith(b"--num_cpu_threads_per_process") for part in cmdline)
    return not (user_set_env or user_set_flag)


def configure_cpu_threads(requested: int | None, local_processes: int) -> str:
    """Set torch's intra-op thread count for a CPU run and return a sentence saying how many and why.

    ``requested`` (``--num_threads``) wins when given. Otherwise, when ``accelerate launch`` pinned the process to
    one thread by default, use physical cores / local processes; an explicit ``OMP_NUM_THREADS`` or
    ``--num_cpu_threads_per_process`` is kept.
    """
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} CPU thread(s) per process (--num_threads)"
    if accelerate_pinned_one_thread():
        threads = max(1, physical_cores() // max(local_processes, 1))
        torch.set_num_threads(threads)
        return (
            f"{threads} CPU thread(s) per process (physical cores / {local_processes} local process(es); "
            "accelerate launch's default of 1 replaced, choose with --num_threads)"
        )
    source = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "torch's default"
    return f"{torch.get_num_threads()} CPU thread(s) per process ({source}; choose with --num_threads)"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Honour ``accelerate launch --use_fsdp`` (``ACCELERATE_USE_FSDP=true``) on CPU processes; whether it did.

    Accelerate 1.15 turns FSDP on only for GPU-like devices: with ``--cpu`` / ``ACCELERATE_USE_CPU=true`` it
    silently runs plain DDP (``MULTI_CPU``) instead. torch's FSDP2 (``fully_shard``) itself works on CPU with
    gloo, so this sets what Accelerate sets on a GPU (``AcceleratorState.__init__``): distributed type FSDP, in
    both state singletons, and the plugin read from the launcher's environment. Call it right after creating the
    Accelerator, before ``prepare``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
