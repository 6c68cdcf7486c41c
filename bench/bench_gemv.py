#!/usr/bin/env python
"""How fast torch streams weights through a one-row matrix product on this CPU (a batch-1 generation step's kernel).

    .venv/bin/python bench/bench_gemv.py

40 weights of 2048 x 512 (160 MiB in fp32, far beyond the caches), each multiplied by one input row, as
``F.linear`` does in a generation step; weight bytes read per second, best of 5, with 1 and 2 threads:

* ``F.linear(x, W)`` with W stored ``[out, in]`` (the ``nn.Linear`` layout), fp32;
* ``x @ W_t`` with the same weights stored ``[in, out]`` (contiguous transpose), fp32;
* ``split_weight_linear`` (what hf_txl's generation steps run on the CPU): the same ``[out, in]`` weights as one
  ``bmm`` over blocks of their output rows;
* ``F.linear`` with bf16 weights and input (half the bytes), and its time relative to fp32;
* ``one_row_linear`` (``addmv``, what hf_txl's bf16 / fp16 generation steps run on the CPU) with the bf16 weights;
* the copy rate of a 512 MiB tensor (read + write) and the read-only rate (a sum), for comparison.

Then, with all threads, ``F.linear`` against ``split_weight_linear`` for 1 to 512 input rows over the mid config's
weight shapes (where hf_txl's ``FEW_ROWS`` cut-off comes from).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_txl.kernels_txl import one_row_linear, split_weight_linear  # noqa: E402
from hf_txl.training import keep_freed_memory_in_process  # noqa: E402


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
    all_threads = torch.get_num_threads()
    keep_freed_memory_in_process()  # as the training and evaluation scripts: no page faults on fresh outputs
    torch.manual_seed(0)
    weights = [torch.randn(2048, 512) for _ in range(40)]
    weights_t = [w.t().contiguous() for w in weights]
    weights_bf16 = [w.bfloat16() for w in weights]
    x, x_bf16 = torch.randn(1, 512), torch.randn(1, 512).bfloat16()
    fp32_bytes = sum(w.numel() for w in weights) * 4
    src = torch.empty(512 * 2**20 // 4).uniform_()  # written: untouched pages would read as the zero page
    dst = torch.empty_like(src)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    header = ("threads", "linear fp32", "x @ W_t fp32", "split bmm fp32", "linear bf16", "bf16/fp32 time",
              "addmv bf16", "copy", "read (sum)")  # fmt: skip
    print(" | ".join(header))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        linear = best_seconds(lambda: [F.linear(x, w) for w in weights])
        transposed = best_seconds(lambda: [x @ w for w in weights_t])
        split = best_seconds(lambda: [split_weight_linear(x, w, None) for w in weights])
        bf16 = best_seconds(lambda: [F.linear(x_bf16, w) for w in weights_bf16])
        addmv = best_seconds(lambda: [one_row_linear(x_bf16, w, None) for w in weights_bf16])
        copy = best_seconds(lambda: dst.copy_(src), inner=2)
        read = best_seconds(lambda: src.sum(), inner=2)
        cells = (
            f"{threads}", f"{fp32_bytes / linear / 1e9:.1f} GB/s", f"{fp32_bytes / transposed / 1e9:.1f} GB/s",
            f"{fp32_bytes / split / 1e9:.1f} GB/s", f"{fp32_bytes / 2 / bf16 / 1e9:.1f} GB/s", f"{bf16 / linear:.2f}x",
            f"{fp32_bytes / 2 / addmv / 1e9:.1f} GB/s",
            f"{2 * src.numel() * 4 / copy / 1e9:.1f} GB/s", f"{src.numel() * 4 / read / 1e9:.1f} GB/s",
        )  # fmt: skip
        print(" | ".join(cells))
    torch.set_num_threads(all_threads)
    shapes = [(1536, 512), (512, 512), (2048, 512), (512, 2048)] * 6  # the mid config's six layers
    mid = [torch.randn(*shape) for shape in shapes]
    biases = [torch.randn(shape[0]) for shape in shapes]
    print(f"\nrows | F.linear | split_weight_linear | F.linear time / split time ({torch.get_num_threads()} threads)")
    for rows in (1, 8, 32, 64, 128, 256, 512):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in mid}
        linear = best_seconds(lambda x=inputs: [F.linear(x[w.shape[1]], w, b) for w, b in zip(mid, biases)], inner=3)
        split = best_seconds(lambda x=inputs: [split_weight_linear(x[w.shape[1]], w, b) for w, b in zip(mid, biases)],
                             inner=3)  # fmt: skip
        print(f"{rows} | {linear * 1e3:.2f} ms | {split * 1e3:.2f} ms | {linear / split:.2f}x")


if __name__ == "__main__":
    main()
