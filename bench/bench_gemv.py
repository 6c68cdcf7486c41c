#!/usr/bin/env python
"""How fast torch streams weights through a one-row matrix product on this CPU (a batch-1 generation step's kernel).

    .venv/bin/python bench/bench_gemv.py

40 weights of 2048 x 512 (160 MiB in fp32, far beyond the caches), each multiplied by one input row, as
``F.linear`` does in a generation step; weight bytes read per second, best of 5, with 1 and 2 threads:

* ``F.linear(x, W)`` with W stored ``[out, in]`` (the ``nn.Linear`` layout), fp32;
* ``x @ W_t`` with the same weights stored ``[in, out]`` (contiguous transpose), fp32;
* ``F.linear`` with bf16 weights and input (half the bytes), and its time relative to fp32;
* the copy rate of a 512 MiB tensor (read + write), the machine's bandwidth, for comparison.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def best_seconds(fn, repeats: int = 5, inner: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(2048, 512) for _ in range(40)]
    weights_t = [w.t().contiguous() for w in weights]
    weights_bf16 = [w.bfloat16() for w in weights]
    x, x_bf16 = torch.randn(1, 512), torch.randn(1, 512).bfloat16()
    fp32_bytes = sum(w.numel() for w in weights) * 4
    src = torch.empty(512 * 2**20 // 4)
    dst = torch.empty_like(src)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    header = ("threads", "linear fp32", "x @ W_t fp32", "linear bf16", "bf16/fp32 time", "copy")
    print(" | ".join(header))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        linear = best_seconds(lambda: [F.linear(x, w) for w in weights])
        transposed = best_seconds(lambda: [x @ w for w in weights_t])
        bf16 = best_seconds(lambda: [F.linear(x_bf16, w) for w in weights_bf16])
        copy = best_seconds(lambda: dst.copy_(src), inner=2)
        cells = (
            f"{threads}", f"{fp32_bytes / linear / 1e9:.1f} GB/s", f"{fp32_bytes / transposed / 1e9:.1f} GB/s",
            f"{fp32_bytes / 2 / bf16 / 1e9:.1f} GB/s", f"{bf16 / linear:.2f}x",
            f"{2 * src.numel() * 4 / copy / 1e9:.1f} GB/s",
        )  # fmt: skip
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
