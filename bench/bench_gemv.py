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
weight shapes (where hf_txl's ``FEW_ROWS`` cut-off comes from); and the same weights in bf16 and int8 for 1 to 8 rows:
``F.linear`` and ``addmv`` in bf16, the packed forms of ``packed_linear`` (FBGEMM's float16-weight product, oneDNN's
packed bf16: where ``PACKED_ROWS`` comes from), torch's int8 weight-packed product with float32 and with bf16 inputs
(``int8_weight_linear``), and the dequantize-then-multiply that torchao's CPU path does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_txl.kernels_txl as kernels  # noqa: E402
from hf_txl.kernels_txl import (  # noqa: E402
    int8_weight_linear,
    one_row_linear,
    packed_linear,
    packed_weight,
    split_weight_linear,
)
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
    low_precision(mid, biases)


@torch.no_grad()  # inference, as hf_txl takes these forms (with gradients they are not taken)
def low_precision(mid, biases) -> None:
    """The mid config's weights in bf16 and in int8 (per-row scales, as torchao's Int8WeightOnlyConfig): weight bytes
    per second of each product form for 1 to 8 rows, counted at the weight's own size (2 or 1 bytes a weight)."""
    layers = []
    for w, b in zip(mid, biases):
        layer = torch.nn.Linear(w.shape[1], w.shape[0]).bfloat16()
        layer.weight.data, layer.bias.data = w.bfloat16(), b.bfloat16()
        layers.append(layer)
    bf16_bytes = sum(w.numel() for w in mid) * 2
    int8_bytes = bf16_bytes // 2
    int8 = []
    for w in mid:
        scale = w.abs().amax(1) / 127
        int8.append((torch.round(w / scale[:, None]).to(torch.int8), scale.bfloat16(), scale))
    chosen = kernels.packed_form()
    packs = {}
    forms = ["fbgemm"] * (chosen == "fbgemm") + ["onednn"] * kernels.onednn_bf16_supported()  # what this CPU packs
    for name in forms:
        kernels.PACKED_FORM = name
        packs[name] = [packed_weight(layer) for layer in layers]
        for layer in layers:
            layer.__dict__.pop(kernels.FAST_WEIGHT_ATTRIBUTE, None)
    kernels.PACKED_FORM = chosen
    print(
        f"\nbf16 and int8 weights, {torch.get_num_threads()} threads, weight bytes / s (the packed form hf_txl "
        f"takes here: {chosen or 'none'})"
    )
    print(
        "rows | F.linear bf16 | addmv bf16 | packed fbgemm (fp16 weights) | packed oneDNN bf16 | int8pack, fp32 "
        "inputs | int8pack, bf16 inputs (int8_weight_linear) | dequantize + F.linear (torchao's CPU path)"
    )

    def rate(fn, nbytes, inner=3):
        return f"{nbytes / best_seconds(fn, inner=inner) / 1e9:.1f} GB/s"

    def row(rows: int) -> list[str]:
        x = {n: torch.randn(rows, n).bfloat16() for n in (512, 2048)}
        x32 = {n: v.float() for n, v in x.items()}
        cells = [str(rows), rate(lambda: [F.linear(x[m.in_features], m.weight, m.bias) for m in layers], bf16_bytes)]
        cells.append(rate(lambda: [one_row_linear(x[m.in_features], m.weight, m.bias) for m in layers], bf16_bytes)
                     if rows == 1 else "(one row only)")  # fmt: skip
        for name in ("fbgemm", "onednn"):
            weights = packs.get(name)
            cells.append("n/a" if weights is None else rate(
                lambda w=weights: [packed_linear(x[m.in_features], p, m.bias) for m, p in zip(layers, w)], bf16_bytes
            ))  # fmt: skip
        cells.append(rate(lambda: [torch._weight_int8pack_mm(x32[q.shape[1]], q, s) for q, _, s in int8], int8_bytes,
                          inner=1))  # fmt: skip
        cells.append(rate(lambda: [int8_weight_linear(x32[q.shape[1]], q, s, None) for q, s, _ in int8], int8_bytes))
        cells.append(rate(lambda: [F.linear(x32[q.shape[1]], q.float() * s[:, None]) for q, _, s in int8], int8_bytes,
                          inner=1))  # fmt: skip
        return cells

    for rows in (1, 2, 4, 8):
        print(" | ".join(row(rows)))


if __name__ == "__main__":
    main()
