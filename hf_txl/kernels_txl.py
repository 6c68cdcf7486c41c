# Copyright 2026 The hf_txl Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Kernel choices of hf_txl's Transformer-XL: faster forms of the reference maths in ``modeling_txl.py``.

Every function here computes what a line of the reference computes (``F.dropout``, ``F.linear``,
``eager_rel_attention``) with fewer passes over memory, or with a CPU kernel that streams the weights faster. Each
exists for a measured reason (``bench/``: ``bench_kernels.py``, ``bench_gemv.py``, ``bench_speed.py``), and is tested
against the reference (``tests/test_kernels.py``, ``tests/test_speed_paths.py``, ``tests/test_flex_attention.py``,
``tests/test_low_precision.py``):

* **Dropout** (:func:`fast_dropout`): the keep mask from 16-bit pieces of 64-bit random words, applied through a
  uint8 mask and one ``addcmul``. On the CPU ``F.dropout`` draws one Bernoulli sample per element, and torch's bool
  kernels are 2.5-10x slower than the uint8 forms: 3-6x faster there, and dropout is a quarter of a small model's
  training step. Taken with the ``"sdpa"`` implementation (:func:`dropout_function`).
* **Products of a few rows** (:func:`project`, a generation step on the CPU): one row through torch's ``F.linear``
  reads the weights at about a third of the memory bandwidth on AMD EPYC, where a batched product over blocks of the
  weight's rows (:func:`split_weight_linear`) reads them at close to it (3.2x one row, 2 threads); on Intel Xeon
  ``F.linear`` is the faster one (the split product 2.5x slower). The form is chosen once per process from what the
  CPU is (its vendor in ``/proc/cpuinfo``), or by ``HF_TXL_CPU_PRODUCTS=column|row`` (:func:`cpu_product_form`);
  no timing decides it, so a model's outputs do not depend on the machine's load.
* **bf16 and int8 weights** in those products: up to ``PACKED_ROWS`` bf16 rows take a packed copy of the weight
  (:func:`packed_linear`: FBGEMM's float16-weight product, else oneDNN's packed bf16; 1.5-3x ``F.linear``'s read
  rate on AMD EPYC), one fp16 row (or bf16 without a packed form) ``addmv`` (:func:`one_row_linear`); weights that
  torchao quantized to int8 weight-only take torch's int8 weight-packed product with bf16 inputs
  (:func:`int8_weight_linear`), where torchao's CPU path dequantizes the whole weight at every call. A bf16 model's
  inference cache keeps its projections in float32 on the CPU (:func:`inference_projection_dtype`).
* **Attention** with the signature of ``eager_rel_attention`` (registry :class:`TxlAttentionInterface`, chosen by
  ``config._attn_implementation``): :func:`sdpa_rel_attention` (the default: the position term as SDPA's additive
  mask, no shift copy, the mask added once) and :func:`flex_rel_attention` (``torch.nn.attention.flex_attention``).
  Each is called with the eager reference as ``reference=``, to run where it cannot (flex without a backward on the
  CPU); this file never imports the model file.

This file is shipped next to the weights by ``save_pretrained`` (``trust_remote_code`` without hf_txl): it imports
only torch and transformers.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import AttentionInterface
from transformers.utils import logging

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------


class _WordDropout(torch.autograd.Function):
    """Dropout whose keep mask comes from 16-bit random words (see :func:`fast_dropout`)."""

    @staticmethod
    def forward(ctx, x, p):
        threshold = round(p * 65536)  # P(keep) = 1 - threshold / 2^16
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), 2**63 - 1)  # uniform over (almost) all 64-bit patterns
        keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device)  # 0 / 1, one byte per element
        torch.ge(words.view(torch.int16)[: x.numel()].view(x.shape), threshold - 32768, out=keep)
        ctx.scale = 65536 / (65536 - threshold)
        ctx.save_for_backward(keep)
        return _keep_scaled(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _keep_scaled(grad, keep, ctx.scale), None


def _keep_scaled(x, keep, scale):
    """``x * keep * scale`` in one pass, ``keep`` a uint8 0 / 1 mask (``x``'s dtype out). Bool masks take slow
    kernels on the CPU: ``where`` or ``masked_fill`` with a bool mask, or a comparison writing bool, are 2.5-10x
    slower than the uint8 forms (``bench/bench_kernels.py``)."""
    return torch.addcmul(x.new_zeros(()), x, keep, value=scale)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, ``x * keep / P(keep)``, with a cheaper random mask on the CPU.

    ``F.dropout`` on the CPU draws one Bernoulli sample per element from the Mersenne twister; drawing 64-bit
    words and comparing their 16-bit pieces with ``p`` into a uint8 mask is 3-6x faster, and dropout is a quarter
    of a small model's training step there. ``p`` is rounded to a multiple of 2^-16 and the scale uses the rounded
    value, so the output stays unbiased. Other devices (fused dropout kernels already) and ``p`` in {0, 1} use
    ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _WordDropout.apply(x, p)


def dropout_function(implementation: str | None):
    """The dropout of an attention implementation, called as ``dropout(x, p, training)``: :func:`fast_dropout` for
    ``"sdpa"``; ``F.dropout`` for the eager reference (and flex_attention)."""
    return fast_dropout if implementation == "sdpa" else F.dropout


# ----------------------------------------------------------------------------------------------------
# Products of a few rows (generation steps on the CPU)
# ----------------------------------------------------------------------------------------------------

FEW_ROWS = 128  # up to this many input rows (batch x tokens), CPU inference may take the split-weight product
PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)  # weights of these types are plain float tensors
REDUCED_FLOATS = (torch.bfloat16, torch.float16)  # one row in these takes addmv without a packed form (one_row_linear)
CPU_PRODUCTS_VARIABLE = "HF_TXL_CPU_PRODUCTS"  # the override of the float32 few-row product form
CPU_PRODUCT_FORMS = ("column", "row")
CPU_PRODUCT_FORM: str | None = None  # chosen at the first few-row product of the process (cpu_product_form)


def choose_cpu_products(cpuinfo: str, override: str | None = None) -> tuple[str, str]:
    """The float32 few-row product form for a CPU, and why: ``"column"`` (the weight times a column of inputs,
    :func:`split_weight_linear`, and the one-query position term as ``P @ q``) or ``"row"`` (``F.linear``,
    ``q @ P^T``). ``cpuinfo`` describes the CPU (``/proc/cpuinfo``'s text); ``override`` is the value of
    ``HF_TXL_CPU_PRODUCTS`` (None or empty: choose by the CPU).

    AMD CPUs take the column form: on an AMD EPYC VM torch's one-row ``F.linear`` reads float32 weights at 10.6 GB/s
    and the split product at 30.6 GB/s, the machine's read rate (``bench/bench_gemv.py``, 2 threads: 3.2x faster for
    one row). Others take torch's own ``F.linear``: on an Intel Xeon (Sapphire Rapids) VM it reads at 16.7 GB/s and
    the split product at 6.4 GB/s (2.5x slower); the column form is untested on other CPUs. Both forms compute the
    same product; they may differ in the last bits.
    """
    if override is not None and override.strip():
        form = override.strip().lower()
        if form not in CPU_PRODUCT_FORMS:
            raise ValueError(
                f"{CPU_PRODUCTS_VARIABLE}={override!r} is not a product form: set it to 'column' (split_weight_linear, "
                "faster on AMD EPYC) or 'row' (F.linear, faster on Intel Xeon), or unset it to choose by the CPU."
            )
        return form, f"{CPU_PRODUCTS_VARIABLE}={form}"
    if "AuthenticAMD" in cpuinfo:
        return "column", "an AMD CPU (on AMD EPYC one-row F.linear reads weights at a third of the split bmm's rate)"
    if "GenuineIntel" in cpuinfo:
        return "row", "an Intel CPU (on Intel Xeon F.linear reads weights 2.5x faster than the split bmm)"
    return "row", "neither AMD nor Intel: torch's own F.linear (the column form is measured faster on AMD only)"


def read_cpuinfo() -> str:
    """The first processor's block of ``/proc/cpuinfo`` (Linux), or ``platform.processor()`` elsewhere (which
    names the vendor on Windows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = []
            for line in handle:
                if not line.strip() and lines:
                    break
                lines.append(line)
            return "".join(lines)
    except OSError:
        return platform.processor()


def cpu_product_form() -> str:
    """``"column"`` or ``"row"``: the float32 few-row product form of this process, chosen once (at the first
    few-row product) by :func:`choose_cpu_products` from ``HF_TXL_CPU_PRODUCTS`` or the CPU's vendor, and logged
    (info level)."""
    global CPU_PRODUCT_FORM
    if CPU_PRODUCT_FORM is None:
        form, reason = choose_cpu_products(read_cpuinfo(), os.environ.get(CPU_PRODUCTS_VARIABLE))
        logger.info(
            f"hf_txl: float32 products of a few rows on the CPU take the {form} form "
            f"({'split_weight_linear' if form == 'column' else 'F.linear'}): {reason}. "
            f"Set {CPU_PRODUCTS_VARIABLE}=column or row to choose."
        )
        CPU_PRODUCT_FORM = form
    return CPU_PRODUCT_FORM


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; on the CPU without gradients, inputs of at most ``FEW_ROWS`` rows (a generation step) call
    a product kernel directly. float32: :func:`split_weight_linear` where this CPU takes the column form
    (:func:`cpu_product_form`), else ``F.linear`` (which skips the module call). bf16, up to ``PACKED_ROWS`` rows: a
    packed copy of the weight (:func:`packed_linear`); bf16 / fp16 otherwise, one row: :func:`one_row_linear`.
    torchao int8 weight-only weights: :func:`int8_weight_linear`. Anything else (autocast, gradients, hooks, other
    subclasses such as adapter layers or other quantized formats, other devices, mixed dtypes, tracing) calls the
    layer itself."""
    weight = layer.weight
    if (
        x.numel() > FEW_ROWS * x.shape[-1]
        or type(layer) is not nn.Linear
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or _bias_requires_grad(layer)))
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return layer(x)
    if type(weight) not in PLAIN_TENSOR_TYPES:  # e.g. a DTensor (FSDP), or a quantized weight
        int8 = int8_weight_parts(layer) if x.dtype in INT8_ACTIVATION_DTYPES else None
        return layer(x) if int8 is None else int8_weight_linear(x, *int8, layer.bias)
    if x.dtype != weight.dtype:
        return layer(x)
    if x.dtype == torch.float32:
        if cpu_product_form() == "column":
            return split_weight_linear(x, weight, layer.bias)
        return F.linear(x, weight, layer.bias)
    if x.dtype == torch.bfloat16 and x.numel() <= PACKED_ROWS * x.shape[-1]:
        packed = packed_weight(layer)
        if packed is not None:
            return packed_linear(x, packed, layer.bias)
    if x.dtype in REDUCED_FLOATS and x.numel() == x.shape[-1]:
        return one_row_linear(x, weight, layer.bias)
    return layer(x)


def _bias_requires_grad(layer: nn.Linear) -> bool:
    return layer.bias is not None and layer.bias.requires_grad


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of one row (``x`` ``[..., in]`` with one row in all) as a matrix-vector product: on the CPU in
    bf16 / fp16, ``addmv`` streams the weights 1.4x faster than ``F.linear``'s matrix-product path
    (``bench/bench_gemv.py``: 11.5 vs 8.1 GB/s in bf16 on the Intel AMX VM), with the same result there."""
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


def split_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows as one batched product over P blocks of the weight's output rows
    (a view, no copy): ``[P, out/P, in] @ [P, in, rows]``. On CPUs where ``F.linear``'s one-row kernel reads the weight
    at a third of the memory bandwidth (AMD EPYC), torch's CPU ``bmm`` streams it at close to it; elsewhere it is
    slower (:func:`choose_cpu_products`). x ``[..., in]``."""
    out_features, in_features = weight.shape
    blocks = 8 if out_features % 8 == 0 else 4 if out_features % 4 == 0 else 2 if out_features % 2 == 0 else 1
    rows = x.numel() // in_features
    inputs = x.reshape(rows, in_features).t().expand(blocks, in_features, rows)  # [P, in, rows] (strides 0, 1, in)
    weight_blocks = weight.view(blocks, out_features // blocks, in_features)  # [P, out/P, in]
    if bias is None:
        out = torch.bmm(weight_blocks, inputs)
    else:
        out = torch.baddbmm(bias.view(blocks, -1, 1), weight_blocks, inputs)  # [P, out/P, rows]
    if rows != 1:
        out = out.view(out_features, rows).t().contiguous()  # [rows, out]
    return out.view(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------------
# Products of a few rows with bf16 and int8 weights
# ----------------------------------------------------------------------------------------------------

INT8_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # inputs int8_weight_linear takes (computed in bf16)
PACKED_ROWS = 4  # up to this many input rows, bf16 products take a packed copy of the weight (packed_linear)
FP16_MAX = 65504.0  # the largest float16
FAST_WEIGHT_ATTRIBUTE = "_txl_fast_weight"  # a Linear's prepared weight (_Prepared)
PACKED_FORM: str | None = None  # "fbgemm", "onednn" or "" (none): chosen once per process (packed_form)


def packed_form() -> str:
    """How this torch packs bf16 weights for products of a few rows, probed once per process: ``"fbgemm"`` (FBGEMM's
    float16-weight, float32-activation product: x86 builds), else ``"onednn"`` (oneDNN's bf16 product with its
    blocked weight layout, where oneDNN has bf16), else ``""`` (neither)."""
    global PACKED_FORM
    if PACKED_FORM is None:
        PACKED_FORM = ""
        try:
            with warnings.catch_warnings():  # torch warns (once) that these functions are deprecated
                warnings.simplefilter("ignore")
                packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.ones(8, 8))
                torch.fbgemm_linear_fp16_weight(torch.ones(1, 8), packed, torch.zeros(8))
            PACKED_FORM = "fbgemm"
        except (AttributeError, RuntimeError):  # a build without FBGEMM, or a torch that removed them
            if onednn_bf16_supported():
                PACKED_FORM = "onednn"
    return PACKED_FORM


def onednn_bf16_supported() -> bool:
    """Whether oneDNN can pack and multiply bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _Prepared:
    """A prepared weight kept on a module, with the key of the weight it came from. Not a parameter or buffer (never
    saved, never moved); a copy of the module (``copy.deepcopy``) gets none and prepares its own."""

    __slots__ = ("key", "value")

    def __init__(self, key: tuple, value):
        self.key, self.value = key, value

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def _prepared(layer: nn.Linear, source: torch.Tensor, prepare):
    """``prepare()``, kept on ``layer`` until ``source`` changes: same storage, shape and in-place version (an
    inference tensor, which keeps no version, cannot be changed in place outside inference mode)."""
    key = (source.data_ptr(), source.shape, -1 if source.is_inference() else source._version)
    kept = layer.__dict__.get(FAST_WEIGHT_ATTRIBUTE)
    if kept is None or kept.key != key:
        kept = _Prepared(key, prepare())
        layer.__dict__[FAST_WEIGHT_ATTRIBUTE] = kept
    return kept.value


def packed_weight(layer: nn.Linear) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """``(form, packed, zeros)``: ``layer.weight`` (bf16) packed for :func:`packed_linear` at the first call and kept
    until the weight changes (``zeros``: a float32 bias for products without one), or None (no packed form here;
    FBGEMM's and a weight beyond float16's range). The packed copy is as large as the weight: a bf16 model generating
    on the CPU holds its projection weights twice."""
    weight = layer.weight.detach()

    def prepare():
        form = packed_form()
        if form == "fbgemm" and bool(weight.abs().amax() <= FP16_MAX):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float())
            return form, packed, weight.new_zeros(weight.shape[0], dtype=torch.float32)
        if form == "onednn":
            return form, torch.ops.mkldnn._reorder_linear_weight(weight, 1), None
        return None

    return _prepared(layer, weight, prepare)


def packed_linear(x: torch.Tensor, packed: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of a few bf16 rows with the weight packed by :func:`packed_weight`: products
    accumulated in float32, the result rounded to bf16 once, as ``F.linear``.

    * ``"fbgemm"``: FBGEMM's product of float32 inputs (``x`` exactly) with the weight as float16, which holds every
      bf16 value of magnitude 2^-17 to 65504 exactly (the few smaller weights move by less than 3e-8). It reads the
      weight 1.5-3x faster than ``F.linear`` reads bf16 weights on the AMD EPYC VM, and faster than ``addmv`` and
      oneDNN's packed bf16 product for one row (``bench/bench_gemv.py``: 12.7 against 7.9 GB/s in one run, 25-30
      against 8-9 in another); from 4 rows oneDNN is as fast or faster.
    * ``"onednn"``: oneDNN's bf16 product with its blocked weight layout.
    """
    form, weight, zeros = packed
    if form == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    rows = x.reshape(-1, x.shape[-1]).float()  # [rows, in]
    out = torch.fbgemm_linear_fp16_weight(rows, weight, zeros if bias is None else bias.float())  # [rows, out]
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def int8_weight_parts(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scale)`` of a weight that torchao quantized to int8 weight-only, one scale per output row and no zero
    point (``Int8WeightOnlyConfig()``, what ``TorchAoConfig`` gives ``from_pretrained``): ``W = q * scale[:, None]``,
    q ``[out, in]`` int8, scale ``[out]`` in bf16 (the kernel's dtype). None for any other weight (torchao is not
    imported: the weight is recognised by the attributes of its tensor subclass)."""
    weight = layer.weight
    if type(weight).__name__ != "Int8Tensor" or getattr(weight, "act_quant_kwargs", None) is not None:
        return None
    q, scale, zero = (getattr(weight, name, None) for name in ("qdata", "scale", "zero_point"))
    if (
        not isinstance(q, torch.Tensor)
        or q.dtype != torch.int8
        or q.dim() != 2
        or list(getattr(weight, "block_size", ())) != [1, q.shape[1]]
        or not isinstance(scale, torch.Tensor)
        or scale.numel() != q.shape[0]
    ):
        return None

    def prepare():
        if zero is not None and bool(zero.any()):  # an asymmetric format: torchao computes it
            return None
        return q.contiguous(), scale.reshape(-1).to(torch.bfloat16)

    return _prepared(layer, q, prepare)


def int8_weight_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """``F.linear(x, q * scale[:, None], bias)`` for a few rows through torch's int8 weight-packed product
    (``torch._weight_int8pack_mm``), whose CPU kernel is vectorised for bf16 inputs only: ``x`` is rounded to bf16,
    the products accumulate in float32 and the result is rounded to bf16 once, then returned in ``x``'s dtype. It
    reads the int8 weight at 9-21 GB/s for one row on the AMD EPYC VM, where the same kernel with float32 inputs reads
    1-2 GB/s and torchao's own path for a CPU ``Int8Tensor``, which dequantizes the whole weight to float32 at every
    call, 1-6 (``bench/bench_gemv.py``; whole steps: ``bench/bench_speed.py``, section precision)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [rows, in]
    out = torch._weight_int8pack_mm(rows, q, scale)  # [rows, out], bf16
    out = out.to(x.dtype) if bias is None else torch.add(bias, out)  # the bias in x's dtype (promotes bf16 to it)
    return out.view(*x.shape[:-1], q.shape[0])


def align_cpu_parameters(model: nn.Module, alignment: int = 64) -> None:
    """Copy every floating-point CPU parameter and buffer whose data is not ``alignment``-byte aligned into fresh
    (aligned) memory, in place (``.data``: the parameter objects, and so tied weights, stay as they were). torch
    allocates CPU tensors 64-byte aligned; a memory-mapped checkpoint does not."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.is_floating_point() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


# ----------------------------------------------------------------------------------------------------
# Attention: SDPA and flex_attention implementations of the eager reference (same signature)
# ----------------------------------------------------------------------------------------------------


class _ShiftedView(torch.autograd.Function):
    """The rel-shift of a position term computed with a leading zero column, as a view (see
    :func:`scaled_position_scores`); its backward writes the gradient back into the padded layout with one copy
    (autograd's generic slice backward would zero the whole padded tensor first)."""

    @staticmethod
    def forward(ctx, padded):  # [B, H, T, K+1], column 0 zero
        batch, n_head, qlen, klen_1 = padded.shape
        ctx.shape = padded.shape
        return padded.view(batch, n_head, klen_1, qlen)[:, :, 1:].view(batch, n_head, qlen, klen_1 - 1)

    @staticmethod
    def backward(ctx, grad):  # [B, H, T, K]
        batch, n_head, qlen, klen_1 = ctx.shape
        out = grad.new_empty(batch, n_head, qlen * klen_1)
        out[..., :qlen].zero_()  # the padding column's T entries, wrapped to the front
        out[..., qlen:].view(batch, n_head, qlen, klen_1 - 1).copy_(grad)
        return out.view(ctx.shape)


def _shifted_view(padded: torch.Tensor) -> torch.Tensor:
    """``padded`` ``[B, H, T, K+1]`` whose column 0 is zero -> the rel-shifted ``[B, H, T, K]`` (equal to
    the reference's ``rel_shift`` of columns ``1..K``), without a copy."""
    return _ShiftedView.apply(padded)


def scaled_position_scores(query, position_head, v, scaling) -> torch.Tensor:
    """BD * scale ``[B, H, T, K]``, column j for key j, computed without a shift copy: the position projection gets a
    zero column in front (``[H, D, K+1]``), so the matmul itself writes the padded rows of the reference's
    ``rel_shift`` and the shift is a view. One query (a generation step) sits at distance ``K-1-j`` from key j:
    nothing to shift, and the product reads the cached head-major position term in the form this CPU streams faster
    (:func:`cpu_product_form`): ``[H, K, D] @ [H, D, B]`` (column) or ``[H, B, D] @ [H, D, K]`` (row). The scale is
    folded into the smaller operand. Entries of future keys are the shift's garbage (masked later)."""
    if query.shape[2] == 1:
        query_v = (query[:, :, 0] + v) * scaling  # [B, H, D]
        if query.device.type == "cpu" and query.dtype == torch.float32 and cpu_product_form() == "row":
            return torch.matmul(query_v.transpose(0, 1), position_head.transpose(1, 2)).transpose(0, 1)[:, :, None]
        return torch.bmm(position_head, query_v.permute(1, 2, 0)).permute(2, 0, 1)[:, :, None]  # [B, H, 1, K]
    r_k = position_head.transpose(1, 2)  # [H, D, K]
    r_padded = F.pad(r_k * scaling, (1, 0))  # [H, D, K+1], column 0 zero
    return _ShiftedView.apply(torch.matmul(query + v[:, None, :], r_padded))  # [B, H, T, K]


def inference_projection_dtype(hidden: torch.Tensor, projection_dtype: torch.dtype, implementation: str | None):
    """The dtype in which the inference cache keeps the memory's projected keys, values and position term, given the
    projections' own dtype: float32 for bf16 projections on the CPU with the ``"sdpa"`` implementation, else theirs.
    torch's CPU kernels for one bf16 query (SDPA, bmm) read the cache at 3-4 GB/s on the AMD EPYC VM, float32's at
    15-17 GB/s: a bf16 generation step spent more time in attention than in its bf16 products. The cached values are
    the bf16 projections held exactly; :func:`sdpa_rel_attention` computes with float32 keys in float32 and returns
    bf16 (a more exact attention than bf16's). The cache of a bf16 model then takes the memory of a float32 one."""
    if projection_dtype == torch.bfloat16 and hidden.device.type == "cpu" and implementation == "sdpa":
        return torch.float32
    return projection_dtype


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (bool, any shape) as scores to add: 0 where allowed, ``finfo(dtype).min`` where hidden. After
    the addition a hidden score is ``finfo.min`` as ``masked_fill`` gives (float32 / bf16: scores are far below its
    rounding step; float16: within a few units of it), so softmax gives it exactly zero probability and gradient.
    Computed through the mask's bytes: bool kernels are slow on the CPU (see :func:`_keep_scaled`)."""
    return (allowed.view(torch.uint8).to(dtype) - 1) * torch.finfo(dtype).max


def sdpa_rel_attention(module, query, key, value, position_head, allowed, *, u, v, scaling, dropout=0.0, **kwargs):
    """The maths of ``eager_rel_attention`` (the model file's reference) with fewer passes over the ``[B, H, T, K]``
    scores (``attn_implementation="sdpa"``, the default).

    * BD needs no shift copy and carries the scale 1/sqrt(D) (:func:`scaled_position_scores`); the mask is added
      once, to BD, as ``0`` / ``finfo.min`` (:func:`additive_mask`: one pass that also makes BD contiguous, and no
      gradient pass: softmax already gives hidden keys a zero gradient).
    * Without gradients BD is the additive ``attn_mask`` of ``F.scaled_dot_product_attention`` (fused kernels). With
      them (SDPA cannot return a gradient for its mask) one in-place ``baddbmm_`` adds AC into BD, and dropout is
      :func:`fast_dropout`.
    * Keys in float32 with bf16 queries (the CPU inference cache of a bf16 model, :func:`inference_projection_dtype`):
      computed in float32, returned in the queries' dtype.

    Same arguments and shapes as ``eager_rel_attention``; returns the output and None.
    """
    batch, n_head, qlen, d_head = query.shape
    klen = key.shape[2]
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or position_head.requires_grad)
    if key.dtype != query.dtype:  # bf16 queries, float32 projections kept by the cache (inference_projection_dtype)
        out, _ = sdpa_rel_attention(
            module, query.to(key.dtype), key, value, position_head.to(key.dtype), allowed,
            u=u.to(key.dtype), v=v.to(key.dtype), scaling=scaling, dropout=dropout,
        )  # fmt: skip
        return out.to(query.dtype), None
    position_scores = scaled_position_scores(query, position_head, v, scaling)  # BD * scale: [B, H, T, K]
    if allowed is not None:
        position_scores = position_scores + additive_mask(allowed, position_scores.dtype)[:, None]
    if not needs_grad and dropout == 0.0:
        out = F.scaled_dot_product_attention(
            query + u[:, None, :], key, value, attn_mask=position_scores, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None  # [B, T, H, D]
    content_query = (query + u[:, None, :]).reshape(batch * n_head, qlen, d_head)  # [B*H, T, D]
    keys = key.reshape(batch * n_head, klen, d_head).transpose(1, 2)  # [B*H, D, K]
    # AC * scale + (BD * scale, masked) in one GEMM that accumulates into (a fresh copy of) the position term.
    if allowed is None:
        position_scores = position_scores.clone(memory_format=torch.contiguous_format)
    dtype = position_scores.dtype  # in-place ops skip autocast: cast as autocast casts baddbmm's operands
    scores = position_scores.view(batch * n_head, qlen, klen)
    scores.baddbmm_(content_query.to(dtype), keys.to(dtype), alpha=scaling)
    # bf16 / fp16 scores: torch's softmax kernels accumulate in float32 and round once, so the probabilities equal the
    # eager reference's float32 softmax cast back, without the two casts (and their backward) over [B*H, T, K].
    probs = fast_dropout(torch.softmax(scores, dim=-1).to(value.dtype), dropout, module.training)
    out = torch.bmm(probs, value.reshape(batch * n_head, klen, d_head))  # [B*H, T, D]
    return out.view(batch, n_head, qlen, d_head).transpose(1, 2).contiguous(), None  # [B, T, H, D]


FLEX_NO_BACKWARD_DEVICES = ("cpu", "mps")  # where torch's flex_attention refuses inputs that require gradients
FLEX_NO_COMPILE_DEVICES = ("cpu",)  # where inductor cannot lower this flex_attention (its score_mod reads BD)


def flex_rel_attention(
    module, query, key, value, position_head, allowed, *, u, v, scaling, dropout=0.0, reference=None, **kwargs
):
    """The maths of ``eager_rel_attention`` through ``torch.nn.attention.flex_attention``
    (``attn_implementation="flex_attention"``).

    * AC is flex_attention's own query-key product, of ``q + u`` and ``k``, scaled by ``scale=scaling``.
    * BD * scale is computed once (:func:`scaled_position_scores`, ``[B, H, T, K]``) and added by the ``score_mod``,
      which reads ``bd[b, h, q_idx, kv_idx]``; autograd reaches it as a captured buffer.
    * ``allowed`` (causal over [memory; segment], ``same_length``, padding of the memory and of the segment) becomes
      the ``block_mask``, whose ``mask_mod`` reads ``allowed[b, q_idx, kv_idx]``; a compiled kernel skips the blocks
      it hides. ``allowed=None`` (a generation step that sees every key) needs no mask.
    * Attention dropout (``config.dropatt``) cannot be expressed (flex_attention never exposes the probabilities):
      training with ``dropatt > 0`` raises a ``ValueError``.
    * flex_attention has no backward on the CPU (nor MPS): when autograd needs gradients there (training, or a
      forward outside ``torch.no_grad()``), this call computes ``reference`` (the eager reference, which the model
      passes) instead, with a one-time warning. Under ``torch.no_grad()`` / ``inference_mode`` the CPU runs
      flex_attention.
    * Outside ``torch.compile`` flex_attention traces ``score_mod`` / ``mask_mod`` with dynamo (its ``"eager"``
      backend: no C++ compiler or Triton is needed) and runs an unfused implementation that materialises the
      ``[B, H, T, K]`` scores: correct, not faster than eager. ``torch.compile`` the model for the fused kernel (CUDA).
      On the CPU inductor cannot lower it (torch 2.13: no kernel choice for a ``score_mod`` that reads a tensor), so
      there a compiled model runs :func:`sdpa_rel_attention` (the same maths) instead, with a one-time warning.

    Same arguments and shapes as ``eager_rel_attention`` (and ``reference=``); returns the output and None.
    """
    if dropout > 0.0 and module.training:
        raise ValueError(
            f"attn_implementation='flex_attention' cannot apply attention dropout (config.dropatt={dropout}): "
            "flex_attention never exposes the attention probabilities. Train with dropatt=0.0, or with "
            "attn_implementation='sdpa' or 'eager'."
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, position_head, u, v))
    if needs_grad and query.device.type in FLEX_NO_BACKWARD_DEVICES:
        if reference is None:
            raise ValueError(
                f"flex_attention has no backward pass on {query.device.type}: pass the eager reference as "
                "`reference=` (the model does), or call under torch.no_grad()."
            )
        logger.warning_once(
            f"flex_attention has no backward pass on {query.device.type}: attention with gradients runs the eager "
            "reference (same maths) instead. Use torch.no_grad() for inference, or a CUDA device to train with flex."
        )
        return reference(module, query, key, value, position_head, allowed, u=u, v=v, scaling=scaling, dropout=dropout)
    if query.device.type in FLEX_NO_COMPILE_DEVICES and torch.compiler.is_compiling():
        logger.warning_once(
            f"torch.compile cannot lower flex_attention with hf_txl's position term on {query.device.type}: the "
            "compiled model runs the SDPA implementation (same maths) there. Compile on a CUDA device for flex's "
            "fused kernel."
        )
        return sdpa_rel_attention(
            module, query, key, value, position_head, allowed, u=u, v=v, scaling=scaling, dropout=dropout
        )
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, _, qlen, _ = query.shape
    klen = key.shape[2]
    position_scores = scaled_position_scores(query, position_head, v, scaling)  # BD * scale: [B, H, T, K]

    def add_position_term(score, b, h, q_idx, kv_idx):
        return score + position_scores[b, h, q_idx, kv_idx]

    block_mask = None
    if allowed is not None:
        allowed_keys = allowed.expand(batch, qlen, klen)  # [B, T, K] (a view when allowed is [1, T, K])

        def key_is_allowed(b, h, q_idx, kv_idx):
            return allowed_keys[b, q_idx, kv_idx]

        mask_batch = None if allowed.shape[0] == 1 else batch  # None: one mask for the whole batch
        block_mask = create_block_mask(key_is_allowed, mask_batch, None, qlen, klen, device=query.device)
    out = flex_attention(
        query + u[:, None, :], key, value, score_mod=add_position_term, block_mask=block_mask, scale=scaling
    )  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, D]


class TxlAttentionInterface(AttentionInterface):
    """The relative-attention implementations, by ``config._attn_implementation`` (``"eager"``, the default, is the
    model file's ``eager_rel_attention``). Their signature is not transformers' (they take the position term), so they
    live in this registry of their own: ``TxlAttentionInterface.register("name", fn)`` adds one. The model calls each
    with the eager reference as ``reference=`` (for the cases it cannot compute)."""

    _global_mapping = {"sdpa": sdpa_rel_attention, "flex_attention": flex_rel_attention}


TXL_ATTENTION_FUNCTIONS = TxlAttentionInterface()
