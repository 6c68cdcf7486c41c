#!/usr/bin/env python
"""Mask kernels side by side on this CPU: the bool forms against the uint8 / additive forms hf_txl uses.

    .venv/bin/python bench/bench_kernels.py            # the mid config's tensors
    .venv/bin/python bench/bench_kernels.py --threads 1

A training step applies dropout to every activation and the causal mask to every layer's scores. On some CPUs torch's
bool kernels are several times slower than a pass over the same float tensor (no vectorised bool path), so the
mask's dtype decides whether these passes run at memory speed. Rows, medians of ``--repeats`` calls, the two forms
alternating:

* dropout: the comparison of random 16-bit words with ``p`` writing bool, then ``where(keep, x, 0).mul_(scale)``, vs
  writing uint8 (``out=``), then ``addcmul(0, x, keep, value=scale)`` (``hf_txl.kernels_txl._WordDropout``);
  and the apply alone (the backward pass);
* attention mask: ``scores.masked_fill(~allowed, min)`` vs ``scores + additive_mask(allowed)``
  (``hf_txl.kernels_txl.additive_mask``), on ``[B, H, T, K]`` scores with a ``[1, 1, T, K]`` mask;
* for scale, a plain ``x * 1.1`` over the same tensor (one read, one write: the speed of memory here).

Every pair is checked equal before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_speed import cpu_info  # noqa: E402  (the machine header of bench_speed.py)

from hf_txl.kernels_txl import _keep_scaled, additive_mask  # noqa: E402
from hf_txl.training import keep_freed_memory_in_process  # noqa: E402


def interleaved_ms(slow, fast, repeats: int) -> tuple[float, float]:
    """Median ms of each, calling them alternately (the machine's drift hits both alike)."""
    for _ in range(3):
        slow(), fast()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((slow, times[0]), (fast, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator as it is (default: keep freed memory, as scripts/train.py does)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = not args.default_allocator and keep_freed_memory_in_process()
    cpu = cpu_info()
    print(f"{cpu['model']} ({' '.join(cpu['flags'])}); torch {torch.__version__}, capability "
          f"{cpu['torch_capability']}, {torch.get_num_threads()} threads; keeps freed memory: {kept}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batch, n_head, qlen, klen, d_inner = 8, 8, 128, 256, 2048  # the mid config of bench_speed.py
    rows = []

    def pair(name, slow, fast):
        torch.testing.assert_close(slow(), fast(), rtol=0, atol=0)
        rows.append((name, *interleaved_ms(slow, fast, args.repeats)))

    x = torch.randn(batch, qlen, d_inner, generator=gen)
    words = torch.randint(-(2**15), 2**15, x.shape, dtype=torch.int16, generator=gen)
    threshold, scale = round(0.1 * 65536) - 32768, 65536 / (65536 - round(0.1 * 65536))

    def bool_dropout():  # the mask as bool, then where
        return torch.where(words >= threshold, x, x.new_zeros(())).mul_(scale)

    def uint8_dropout():  # the mask as uint8, then one addcmul (hf_txl.kernels_txl._WordDropout)
        keep = torch.empty(x.shape, dtype=torch.uint8)
        return _keep_scaled(x, torch.ge(words, threshold, out=keep), scale)

    pair("dropout (mask from random words, then apply): bool + where vs uint8 + addcmul", bool_dropout, uint8_dropout)
    keep_u8 = torch.ge(words, threshold, out=torch.empty(x.shape, dtype=torch.uint8))
    keep = keep_u8.bool()
    pair(
        "dropout apply alone (backward): where(bool) vs addcmul(uint8)",
        lambda: torch.where(keep, x, x.new_zeros(())).mul_(scale),
        lambda: _keep_scaled(x, keep_u8, scale),
    )
    scores = torch.randn(batch, n_head, qlen, klen, generator=gen)
    allowed = (torch.rand(1, 1, qlen, klen, generator=gen) > 0.3) | torch.eye(qlen, klen, dtype=torch.bool)
    lowest = torch.finfo(scores.dtype).min
    pair("attention mask: masked_fill(bool) vs + additive_mask", lambda: scores.masked_fill(~allowed, lowest),
         lambda: scores + additive_mask(allowed, scores.dtype))  # fmt: skip
    plain = interleaved_ms(lambda: x * 1.1, lambda: x * 1.1, args.repeats)[0]

    print(f"\n| kernel ({batch}x{qlen}x{d_inner} activations, {batch}x{n_head}x{qlen}x{klen} scores) "
          "| bool form ms | hf_txl form ms | speed-up |\n|---|---:|---:|---:|")  # fmt: skip
    for name, slow_ms, fast_ms in rows:
        print(f"| {name} | {slow_ms:.3f} | {fast_ms:.3f} | {slow_ms / fast_ms:.2f}x |")
    print(f"| for scale: x * 1.1 over the activations (one read, one write) | | {plain:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
