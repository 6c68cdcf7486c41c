"""Transformer-XL (Dai et al. 2019, https://arxiv.org/abs/1901.02860) as a transformers v5 model.

Notation used in shape comments:
    B batch, T tokens of the current segment, M memory length (tokens already processed and kept),
    K = M + T keys, H heads, D head width, d d_model, V vocabulary.

Public tensors are batch-first. Internally attention works in the ``[B, H, T, D]`` layout.

What is kept from the original code (kimiyoung/transformer-xl, ``attn_type=0``):
    * relative positional attention with a sinusoidal R, its own projection ``W_{k,R}`` and the
      biases u (``r_w_bias``) and v (``r_r_bias``), per layer or shared (``untie_r``);
    * segment-level recurrence: layer l attends over ``[mems[l]; h_l]`` where ``mems[l]`` holds the
      *inputs* of layer l at the last M positions, detached from the autograd graph;
    * the first segment starts from an **empty** memory (the transformers 4.x port started from M zero
      vectors that were attended to; ``config.legacy_zero_mems`` reproduces that for converted checkpoints);
    * adaptive input and the projected adaptive log-softmax (``cutoffs``, ``div_val``, ``d_embed``) for word-level
      vocabularies; with them ``TxlForCausalLM.logits`` are log-probabilities;
    * post-norm by default, ReLU feed-forward, embeddings scaled by sqrt(d_model), no final LayerNorm.

Deliberate additions: an ``attention_mask`` for padded batches whose padding is remembered by the
memory (:class:`TxlMems`), an SDPA attention path next to the eager reference, and a transformers-style
``loss`` / ``generate()``.

This file is shipped next to the weights by ``save_pretrained`` so that ``trust_remote_code`` users can
load the model without hf_txl: it only imports torch, transformers and ``.configuration_txl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_txl import TxlConfig

try:  # transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------


class TxlMems(Sequence):
    """The recurrent memory: one batch-first tensor ``[B, M, d_model]`` per layer.

    It behaves as a read-only sequence of ``n_layer`` tensors (``len``, indexing, iteration), so code
    written for the original ``mems`` list keeps working. ``mems[l]`` holds the inputs of layer ``l`` at
    the last ``M`` positions (layer 0's memory is the scaled embedding output). The tensors never carry an
    autograd graph.

    Besides the hidden states it remembers which memory positions were padding
    (``padding_mask``: ``[B, M]`` bool, ``True`` for a real token; ``None`` when every position is real),
    so that left-padded prompts stay masked after they moved into the memory.

    Inference caches (filled only when no gradient is needed and the model is in eval mode, e.g. in
    ``generate()`` or an evaluation loop; ignored otherwise, so training is unaffected):

    * ``kv``: per layer, the projected keys and values ``[B, M, 2 * H * D]`` of the memory positions. They
      depend only on the memory's hidden states and the layer's weights, so the next segment reuses them
      instead of projecting the memory again; truncated to ``mem_len`` together with the hidden states.
    * ``r_head``: per layer, ``W_{k,R} R_p`` ``[K', H * D]`` for distances ``K'-1 .. 0``; it depends only on
      the distance, the weights and ``clamp_len``, so any shorter key length reads its last rows.

    ``cache_key`` records what the caches were computed with (weight versions, dtype, autocast state,
    ``clamp_len``); a model whose key differs recomputes them. During inference the hidden states and ``kv`` are
    views into a preallocated :class:`_MemoryStore`, so a step writes only its own new positions instead of
    copying the whole memory.

    Pass ``outputs.mems`` back as ``mems=`` to continue the recurrence. A plain list or tuple of tensors is
    accepted as well (every position is then taken as a real token).
    """

    def __init__(
        self,
        hidden: Sequence[torch.Tensor],
        padding_mask: torch.Tensor | None = None,
        *,
        kv: Sequence[torch.Tensor] | None = None,
        r_head: Sequence[torch.Tensor] | None = None,
        cache_key: tuple | None = None,
        store: _MemoryStore | None = None,
        store_end: int = 0,
    ):
        self.hidden = tuple(hidden)
        self.padding_mask = padding_mask
        self.kv = None if kv is None else tuple(kv)
        self.r_head = None if r_head is None else tuple(r_head)
        self.cache_key = cache_key
        self.store, self.store_end = store, store_end  # the views' storage, and where they end in it

    def __getitem__(self, index):
        return self.hidden[index]

    def __len__(self) -> int:
        return len(self.hidden)

    def __repr__(self) -> str:
        shape = tuple(self.hidden[0].shape) if self.hidden else ()
        cached = self.kv is not None
        return f"TxlMems(n_layer={len(self)}, shape={shape}, padded={self.padding_mask is not None}, cached={cached})"

    @property
    def mem_len(self) -> int:
        """Number of positions held (M)."""
        return self.hidden[0].shape[1] if self.hidden else 0

    @property
    def batch_size(self) -> int:
        return self.hidden[0].shape[0]

    def _with(self, hidden, mask, kv) -> TxlMems:
        return TxlMems(hidden, mask, kv=kv, r_head=self.r_head, cache_key=self.cache_key)

    def index_select(self, index: torch.Tensor) -> TxlMems:
        """A new memory keeping batch rows ``index`` (beam search reorders its beams with this)."""
        hidden = [h.index_select(0, index.to(h.device)) for h in self.hidden]
        mask = None if self.padding_mask is None else self.padding_mask.index_select(0, index.to(hidden[0].device))
        kv = None if self.kv is None else [c.index_select(0, index.to(c.device)) for c in self.kv]
        return self._with(hidden, mask, kv)

    def repeat_interleave(self, repeats: int) -> TxlMems:
        """Repeat every batch row ``repeats`` times (``num_return_sequences`` / ``num_beams`` expansion)."""
        hidden = [h.repeat_interleave(repeats, dim=0) for h in self.hidden]
        mask = None if self.padding_mask is None else self.padding_mask.repeat_interleave(repeats, dim=0)
        kv = None if self.kv is None else [c.repeat_interleave(repeats, dim=0) for c in self.kv]
        return self._with(hidden, mask, kv)

    def to(self, *args, **kwargs) -> TxlMems:
        """Move / convert the hidden states. The caches are kept when neither device nor dtype change, and
        dropped otherwise (the model recomputes them on the next call)."""
        hidden = [h.to(*args, **kwargs) for h in self.hidden]
        mask = None
        if self.padding_mask is not None:
            mask = self.padding_mask.to(device=hidden[0].device)
        same = hidden[0].dtype == self.hidden[0].dtype and hidden[0].device == self.hidden[0].device
        return self._with(hidden, mask, self.kv) if same else TxlMems(hidden, mask)

    def detach(self) -> TxlMems:
        hidden = [h.detach() for h in self.hidden]
        return TxlMems(hidden, self.padding_mask, kv=self.kv, r_head=self.r_head, cache_key=self.cache_key,
                       store=self.store, store_end=self.store_end)  # fmt: skip

    def appendable(self, qlen: int) -> bool:
        """Whether the next ``qlen`` positions can be written in place after this memory's views (see
        :class:`_MemoryStore`; the caller checks that the caches are fresh)."""
        store = self.store
        return store is not None and store.fill == self.store_end and self.store_end + qlen <= store.capacity

    def without_cache(self) -> TxlMems:
        """The same memory without the inference caches."""
        return TxlMems(self.hidden, self.padding_mask)


class _MemoryStore:
    """Preallocated inference storage behind :class:`TxlMems`: per layer, hidden states ``[B, C, d_model]`` and
    projected keys/values ``[B, C, 2*H*D]`` for ``C`` (capacity) positions, of which ``[0, fill)`` are written.

    A step with memory positions ``[start, end)`` writes its ``T`` new positions at ``[end, end + T)``, attends to
    the contiguous view ``[start, end + T)``, and returns the memory ``[max(start, end + T - mem_len), end + T)``:
    views, no copy of the memory. This is only allowed while ``end == fill``, i.e. no other step has written
    after this memory yet; reusing an older memory (a second continuation of the same prefix) therefore copies it
    into a new store instead of overwriting what a newer memory still shows. When the capacity is reached the
    memory moves to a new store (``C = mem_len + max(T, ceil(mem_len / 4))``), so a generation step copies four
    positions per step on average instead of the whole memory, and the store holds at most a quarter more than the
    memory (or one segment more).
    """

    def __init__(self, hidden: list[torch.Tensor], kv: list[torch.Tensor]):
        self.hidden, self.kv = hidden, kv
        self.capacity = hidden[0].shape[1]
        self.fill = 0

    @classmethod
    def empty(cls, n_layer, batch, capacity, d_model, kv_width, dtype, kv_dtype, device) -> _MemoryStore:
        hidden = [torch.empty(batch, capacity, d_model, dtype=dtype, device=device) for _ in range(n_layer)]
        kv = [torch.empty(batch, capacity, kv_width, dtype=kv_dtype, device=device) for _ in range(n_layer)]
        return cls(hidden, kv)


# ----------------------------------------------------------------------------------------------------
# Positional maths
# ----------------------------------------------------------------------------------------------------


def sinusoid_position_embedding(
    klen: int, d_model: int, clamp_len: int, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """R for relative distances ``K-1, K-2, ..., 0`` (row j holds distance ``K-1-j``).

    R_{p, 2k} = sin(p / 10000^(2k/d)),  R_{p, d/2 + k} = cos(p / 10000^(2k/d))  (sin block then cos block,
    as in the original code). Distances above ``clamp_len`` (when > 0) use R_{clamp_len}.

    Returns ``[K, d_model]``.
    """
    pos_seq = torch.arange(klen - 1, -1, -1.0, device=device, dtype=torch.float32)  # [K]
    if clamp_len > 0:
        pos_seq = pos_seq.clamp(max=clamp_len)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2.0, device=device) / d_model))  # [d/2]
    sinusoid = torch.outer(pos_seq, inv_freq)  # [K, d/2]
    return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1).to(dtype)  # [K, d]


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Realign position scores from "relative distance K-1-c in column c" to "key j in column j".

    ``x[..., i, c]`` holds the score of query i against distance ``K-1-c``. Query i sits at absolute
    position ``M+i`` so key j is at distance ``M+i-j``, i.e. column ``c = j + T-1-i``. The result is
    ``out[..., i, j] = x[..., i, j + T-1-i]`` for ``j <= M+i``; entries with ``j > M+i`` are garbage from
    the wrap-around and are always masked (they are future keys).

    Pad a zero column, view ``[K+1, T]``, drop the first row, view back ``[T, K]``. With T=2, K=3::

        x = [[a0, a1, a2],        out = [[a1, a2, 0 ],   # query 0 sees keys 0..1 (M=1)
             [b0, b1, b2]]               [b0, b1, b2]]   # query 1 sees keys 0..2
    """
    *lead, qlen, klen = x.shape
    x_padded = F.pad(x, (1, 0))  # [..., T, K+1]
    x_padded = x_padded.view(*lead, klen + 1, qlen)  # [..., K+1, T]
    return x_padded[..., 1:, :].view(*lead, qlen, klen)  # [..., T, K]


def causal_memory_mask(qlen: int, mlen: int, mem_len: int, same_length: bool, device=None) -> torch.Tensor:
    """Which keys each query may see: ``[T, K]`` bool, True = attend.

    Query i (0-based in the segment) sees key j iff ``j <= M + i``. With ``same_length`` the original
    code also hides keys so that every query sees at most ``mem_len`` keys once the memory is full.
    """
    klen = mlen + qlen
    i = torch.arange(qlen, device=device)[:, None]  # [T, 1]
    j = torch.arange(klen, device=device)[None, :]  # [1, K]
    allowed = j <= mlen + i
    if same_length:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        allowed = allowed & (j > i - mask_shift_len)
    return allowed


def sees_every_key(qlen: int, mlen: int, mem_len: int, same_length: bool) -> bool:
    """Whether :func:`causal_memory_mask` is all True: one query (a generation step) sees the whole memory,
    unless ``same_length`` hides the oldest key of a full memory. The model then passes ``allowed=None``."""
    return qlen == 1 and (not same_length or mlen + 1 <= mem_len)


# ----------------------------------------------------------------------------------------------------
# Attention kernels: one eager reference, one SDPA path
# ----------------------------------------------------------------------------------------------------


def eager_rel_attention(q, k, v, position_scores, allowed, *, u, scale, dropout_p, training):
    """Reference relative attention.

    score(i, j) = [(q_i + u)·k_j  +  BD(i, j)] / sqrt(D)   with BD the rel-shifted position term,
    softmax over allowed keys, then a weighted sum of the values.

    q ``[B, H, T, D]``, k and v ``[B, H, K, D]``, position_scores ``[B, H, T, K]`` (unscaled BD),
    allowed ``[B|1, T, K]`` bool (None: every key), u ``[H, D]``. Returns the attention output ``[B, H, T, D]``
    and the probabilities ``[B, H, T, K]``.
    """
    content_scores = torch.matmul(q + u[:, None, :], k.transpose(-1, -2))  # AC: [B, H, T, K]
    scores = (content_scores + position_scores) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v), probs  # [B, H, T, D]


class _ShiftedView(torch.autograd.Function):
    """The rel-shift of a position term computed with a leading zero column, as a view (see
    :func:`fused_rel_attention`); its backward writes the gradient back into the padded layout with one copy
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
    :func:`rel_shift` of columns ``1..K``), without a copy."""
    return _ShiftedView.apply(padded)


def fused_rel_attention(q, k, v, r_head, allowed, *, u, v_bias, scale, dropout_p, training):
    """The fast path (``attn_implementation="sdpa"``): the maths of :func:`eager_rel_attention` with fewer passes
    over the ``[B, H, T, K]`` score tensors.

    * The rel-shift costs no copy: the position projection gets a zero column in front (``r_pad`` ``[H, D, K+1]``),
      so the matmul itself writes the padded ``[T, K+1]`` rows of :func:`rel_shift`, and the shift is a view.
    * The scale 1/sqrt(D) is folded into the (small) position projection and into the ``baddbmm``'s alpha.
    * The mask is applied once, to the position term, which then is the additive ``attn_mask`` of SDPA (no
      gradient needed: CPU/GPU fused kernels) or the accumulator of one ``baddbmm`` that adds the content term
      (training: SDPA cannot return a gradient for its mask, and its math fallback is slower than this).

    q ``[B, H, T, D]``, k and v ``[B, H, K, D]``, r_head ``[K, H*D]`` (W_{k,R} R for distances K-1 .. 0),
    allowed ``[B|1, T, K]`` bool (None: every key), u and v_bias ``[H, D]``. Returns the attention output
    ``[B, H, T, D]`` and None.
    """
    batch, n_head, qlen, d_head = q.shape
    klen = k.shape[2]
    r_k = r_head.view(klen, n_head, d_head).permute(1, 2, 0)  # [H, D, K]
    if qlen == 1:  # one query (a generation step) at distance K-1-j from key j: no shift, nothing to pad
        position = torch.matmul((q + v_bias[:, None, :]) * scale, r_k)  # [B, H, 1, K], scaled
    else:
        r_pad = F.pad(r_k * scale, (1, 0))  # [H, D, K+1], column 0 zero
        position = torch.matmul(q + v_bias[:, None, :], r_pad)  # [B, H, T, K+1], scaled
        position = _shifted_view(position)  # [B, H, T, K]: the rel-shift, a view
    bias = position  # [B, H, T, K]
    if allowed is not None:
        bias = position.masked_fill(~allowed[:, None], torch.finfo(position.dtype).min)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or r_head.requires_grad)
    if not needs_grad and not (training and dropout_p > 0):
        out = F.scaled_dot_product_attention(q + u[:, None, :], k, v, attn_mask=bias, scale=scale)
        return out, None
    content_q = (q + u[:, None, :]).reshape(batch * n_head, qlen, d_head)  # [B*H, T, D]
    keys = k.reshape(batch * n_head, klen, d_head).transpose(1, 2)  # [B*H, D, K]
    # AC * scale + (BD * scale, masked) in one GEMM that accumulates into the position term.
    scores = torch.baddbmm(bias.reshape(batch * n_head, qlen, klen), content_q, keys, alpha=scale)  # [B*H, T, K]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    probs = fast_dropout(probs, dropout_p, training)
    out = torch.bmm(probs, v.reshape(batch * n_head, klen, d_head))  # [B*H, T, D]
    return out.view(batch, n_head, qlen, d_head), None


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
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= threshold - 32768
        ctx.scale = 65536 / (65536 - threshold)
        ctx.save_for_backward(keep)
        return _keep_scaled(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _keep_scaled(grad, keep, ctx.scale), None


def _keep_scaled(x, keep, scale):
    # `where` with a 0-dim zero and an in-place scale: no float copy of the bool mask (x * keep makes one).
    return torch.where(keep, x, x.new_zeros(())).mul_(scale)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, ``x * keep / P(keep)``, with a cheaper random mask on the CPU.

    ``F.dropout`` on the CPU draws one Bernoulli sample per element from the Mersenne twister; drawing 64-bit
    words and comparing their 16-bit pieces with ``p`` is 3x faster, and dropout is a quarter of a small model's
    training step there. ``p`` is rounded to a multiple of 2^-16 and the scale uses the rounded value, so the
    output stays unbiased. Other devices (fused dropout kernels already) and ``p`` in {0, 1} use ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _WordDropout.apply(x, p)


class TxlDropout(nn.Dropout):
    """``nn.Dropout`` computed with :func:`fast_dropout` on the fast path (``attn_implementation="sdpa"``);
    the eager reference keeps ``F.dropout``."""

    def __init__(self, config: TxlConfig):
        super().__init__(config.dropout)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config._attn_implementation == "sdpa":
            return fast_dropout(x, self.p, self.training)
        return F.dropout(x, self.p, self.training)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class TxlRelAttention(nn.Module):
    """Multi-head relative attention over ``[memory; segment]`` with its residual and LayerNorm.

    ``qkv_proj`` holds W_q, W_k, W_v stacked (the original ``qkv_net``); queries are projected for the T
    segment positions only, keys and values for all K positions. ``r_proj`` is W_{k,R}.
    """

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.config = config
        self.n_head, self.d_head = config.n_head, config.d_head
        inner = config.n_head * config.d_head
        self.qkv_proj = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.r_proj = nn.Linear(config.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.d_model, bias=False)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.drop = TxlDropout(config)
        self.scaling = 1.0 / math.sqrt(config.d_head)
        self.pre_lnorm = config.pre_lnorm
        self.dropatt = config.dropatt
        if config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # u
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # v

    def forward(
        self, hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions=False,
        kv_buffer=None, memory_kv_ready=False, r_head=None,
    ):  # fmt: skip
        """hidden ``[B, T, d]``, mem ``[B, M, d]`` or None, pos_emb ``[K, d]`` (None when ``r_head`` is given),
        allowed ``[B|1, T, K]`` bool or None (every key visible).

        Inference caches (see :class:`TxlMems`): ``kv_buffer`` ``[B, K, 2*H*D]`` is this layer's view of the memory
        store; the segment's keys and values are written into its last T rows, and its first M rows already hold
        the memory's when ``memory_kv_ready`` (otherwise they are projected and written). ``r_head`` ``[K, H*D]``
        replaces ``r_proj(pos_emb)``. Returns the output ``[B, T, d]`` and the attention probabilities (eager path
        with ``output_attentions``) or None.
        """
        batch, qlen, _ = hidden.shape
        inner = self.n_head * self.d_head
        x = self.layer_norm(hidden) if self.pre_lnorm else hidden
        q, kv = self.qkv_proj(x).split([inner, 2 * inner], dim=-1)  # [B, T, H*D], [B, T, 2*H*D]
        # The memory is projected apart from the segment: it needs no input gradient (it is detached), and the
        # projection is cached during inference.
        mlen = 0 if mem is None else mem.shape[1]
        mem_kv = None
        if mem is not None and not (kv_buffer is not None and memory_kv_ready):
            w_kv = self.qkv_proj.weight[inner:]
            mem_kv = F.linear(self.layer_norm(mem) if self.pre_lnorm else mem, w_kv)  # [B, M, 2*H*D]
        if kv_buffer is not None:  # inference: write into the store, attend to its view
            if mem_kv is not None:
                kv_buffer[:, :mlen].copy_(mem_kv)
            kv_buffer[:, mlen:].copy_(kv)
            kv = kv_buffer  # [B, K, 2*H*D]
        elif mem_kv is not None:
            kv = torch.cat([mem_kv, kv], dim=1)  # [B, K, 2*H*D]
        klen = kv.shape[1]
        k, v = kv.view(batch, klen, 2, self.n_head, self.d_head).unbind(2)  # [B, K, H, D] each
        q = q.view(batch, qlen, self.n_head, self.d_head).transpose(1, 2)  # [B, H, T, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, K, D]
        if r_head is None:
            r_head = self.r_proj(pos_emb)  # [K, H*D]

        implementation = self.config._attn_implementation or "eager"
        if output_attentions or implementation != "sdpa":  # the eager reference (it alone returns probabilities)
            r_k = r_head.view(klen, self.n_head, self.d_head).permute(1, 2, 0)  # [H, D, K]
            # BD(i, c) = (q_i + v)·W_{k,R} R_{K-1-c}, then realigned so column j is key j.
            position_scores = rel_shift(torch.matmul(q + r_r_bias[:, None, :], r_k))  # [B, H, T, K]
            out, probs = eager_rel_attention(
                q, k, v, position_scores, allowed,
                u=r_w_bias, scale=self.scaling, dropout_p=self.dropatt, training=self.training,
            )  # fmt: skip
        else:
            out, probs = fused_rel_attention(
                q, k, v, r_head, allowed,
                u=r_w_bias, v_bias=r_r_bias, scale=self.scaling, dropout_p=self.dropatt, training=self.training,
            )  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, qlen, inner)  # [B, T, H*D]
        out = self.o_proj(out)
        if self.training:  # (skipping the eval no-op saves per-token overhead in generation)
            out = self.drop(out)
        out = hidden + out if self.pre_lnorm else self.layer_norm(hidden + out)
        return out, probs


class TxlFeedForward(nn.Module):
    """Position-wise ReLU feed-forward with residual: ``LN(h + FF(h))`` or, pre-norm, ``h + FF(LN(h))``."""

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_inner)
        self.fc_out = nn.Linear(config.d_inner, config.d_model)
        self.drop = TxlDropout(config)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.pre_lnorm = config.pre_lnorm

    def forward(self, hidden):
        x = self.layer_norm(hidden) if self.pre_lnorm else hidden
        x = F.relu(self.fc_in(x))
        if self.training:
            x = self.drop(x)
        x = self.fc_out(x)
        if self.training:
            x = self.drop(x)
        return hidden + x if self.pre_lnorm else self.layer_norm(hidden + x)


class TxlLayer(nn.Module):
    """One Transformer-XL decoder layer: relative attention then feed-forward."""

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.attn = TxlRelAttention(config)
        self.ff = TxlFeedForward(config)

    def forward(self, hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions=False, *caches):
        """``caches``: ``kv_buffer, memory_kv_ready, r_head`` of :meth:`TxlRelAttention.forward` (positional
        arguments, as gradient checkpointing passes them)."""
        hidden, probs = self.attn(hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions, *caches)
        return self.ff(hidden), probs


# ----------------------------------------------------------------------------------------------------
# Adaptive input and adaptive softmax (word-level vocabularies)
# ----------------------------------------------------------------------------------------------------


def _cluster_dims(config: TxlConfig) -> list[tuple[int, int, int]]:
    """``(start, end, width)`` of every cluster: tokens ``[start, end)`` embedded in ``d_embed // div_val**i``."""
    ends = [0, *config.cutoffs, config.vocab_size]
    d_embed = config.embed_dim()
    return [(ends[i], ends[i + 1], d_embed // config.div_val**i) for i in range(len(ends) - 1)]


class TxlAdaptiveEmbedding(nn.Module):
    """Adaptive input (Baevski & Auli 2019, the original code's ``AdaptiveEmbedding``), **unscaled**.

    Cluster i holds the tokens ``[c_i, c_{i+1})`` in ``d_i = d_embed // div_val**i`` dimensions and projects them to
    ``d_model``:  e(x) = P_i E_i[x - c_i]  for x in cluster i. With ``div_val == 1`` one matrix ``E`` ``[V, d_embed]``
    serves every cluster and one projection ``P`` (only when ``d_embed != d_model``).

    ``emb_layers[i]`` is ``nn.Embedding(n_i, d_i)`` and ``emb_projs[i]`` an ``nn.Linear(d_i, d_model)`` without bias
    (weight ``[d_model, d_i]``, the original ``emb_projs[i]`` layout). Every cluster is computed for every token and
    the right one selected, so that all parameters take part in every step (DDP without unused parameters); the
    cost is ``n_clusters`` small lookups and projections per token. The sqrt(d_model) scale is applied by
    :class:`TxlModel`, as for the plain embedding.
    """

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.div_val = config.div_val
        self.clusters = _cluster_dims(config)
        if config.div_val == 1:
            d_embed = config.embed_dim()
            self.emb_layers = nn.ModuleList([nn.Embedding(config.vocab_size, d_embed)])
            widths = [d_embed] if d_embed != config.d_model else []
        else:
            self.emb_layers = nn.ModuleList(nn.Embedding(end - start, width) for start, end, width in self.clusters)
            widths = [width for _, _, width in self.clusters]
        self.emb_projs = nn.ModuleList(nn.Linear(width, config.d_model, bias=False) for width in widths)

    @property
    def weight(self) -> torch.Tensor:
        """The head cluster's embedding matrix (for code that only needs a dtype / device)."""
        return self.emb_layers[0].weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[B, T]`` -> embeddings ``[B, T, d_model]``."""
        if self.div_val == 1:
            embed = self.emb_layers[0](input_ids)  # [B, T, d_embed]
            return F.linear(embed, self.emb_projs[0].weight) if len(self.emb_projs) else embed
        proj = self.emb_projs[0].weight
        out = proj.new_zeros(*input_ids.shape, proj.shape[0])  # [B, T, d_model]
        for (start, end, _), emb, proj in zip(self.clusters, self.emb_layers, self.emb_projs):
            local = (input_ids - start).clamp(0, end - start - 1)  # ids outside the cluster read a dummy row
            embed = F.linear(emb(local), proj.weight)  # [B, T, d_model]
            in_cluster = ((input_ids >= start) & (input_ids < end))[..., None]  # [B, T, 1]
            out = torch.where(in_cluster, embed, out)
        return out

    def resize_tail(self, new_num_tokens: int, init_std: float) -> None:
        """Grow (or shrink) the last cluster so that the vocabulary holds ``new_num_tokens`` tokens."""
        index = 0 if self.div_val == 1 else len(self.emb_layers) - 1
        old = self.emb_layers[index]
        start = self.clusters[-1][0] if self.div_val != 1 else 0
        self.emb_layers[index] = _resized_embedding(old, new_num_tokens - start, init_std)
        self.clusters[-1] = (self.clusters[-1][0], new_num_tokens, self.clusters[-1][2])


def _resized_embedding(old: nn.Embedding, rows: int, init_std: float) -> nn.Embedding:
    new = nn.Embedding(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    keep = min(rows, old.num_embeddings)
    with torch.no_grad():
        nn.init.normal_(new.weight, std=init_std)
        new.weight[:keep] = old.weight[:keep]
    return new


class TxlSoftmaxCluster(nn.Module):
    """Output bias ``[n_i]`` of one softmax cluster, and its weight ``[n_i, d_i]`` when it is not tied to the input
    embedding (tied clusters read ``emb_layers[i].weight`` at every call: one parameter, no tying machinery)."""

    def __init__(self, n_out: int, d_in: int, own_weight: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, d_in)) if own_weight else None
        self.bias = nn.Parameter(torch.zeros(n_out))

    def resize(self, n_out: int, init_std: float) -> None:
        keep = min(n_out, self.bias.shape[0])
        with torch.no_grad():
            bias = self.bias.new_zeros(n_out)
            bias[:keep] = self.bias[:keep]
            self.bias = nn.Parameter(bias)
            if self.weight is not None:
                weight = self.weight.new_empty(n_out, self.weight.shape[1]).normal_(std=init_std)
                weight[:keep] = self.weight[:keep]
                self.weight = nn.Parameter(weight)


class TxlAdaptiveLogSoftmax(nn.Module):
    r"""Projected adaptive log-softmax (Grave et al. 2017, https://arxiv.org/abs/1609.04309; the original code's
    ``ProjectedAdaptiveLogSoftmax``).

    The head scores the shortlist ``[0, c_1)`` and one logit per tail cluster; tail i scores its own tokens::

        log p(x | h) = log softmax_head(h)[x]                                   x in the shortlist
        log p(x | h) = log softmax_head(h)[c_1 + i - 1] + log softmax_i(h)[x - c_i]   x in tail i

    with ``logits_i(h) = (h P_i) W_i^T + b_i`` (``P_i`` ``[d_model, d_i]`` the projection, skipped when absent).
    The head's weight is ``[W_0; cluster_weight]`` and its bias ``[b_0; cluster_bias]``.

    Weights: ``W_i`` is the input embedding ``emb_layers[i]`` when ``tie_word_embeddings`` (with ``div_val == 1``
    the clusters slice one matrix), else ``out_layers[i].weight``. ``P_i`` is the input projection ``emb_projs[i]``
    (``emb_projs[0]`` when ``div_val == 1``) for the tails when ``proj_share_all_but_first``, else
    ``out_projs[i].weight``, stored in the same ``[d_model, d_i]`` layout and applied as ``h @ P_i``.

    :meth:`forward` returns the full log-probabilities ``[..., V]`` (every cluster for every position: the
    ``[N, V]`` matrix is materialised, which also gives every parameter a gradient, as DDP requires).
    """

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.div_val = config.div_val
        self.clusters = _cluster_dims(config)
        self.n_clusters = len(config.cutoffs)
        self.shortlist_size = self.clusters[0][1]
        self.tie_weights = config.tie_word_embeddings
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, config.embed_dim()))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        if config.div_val == 1:
            d_embed = config.embed_dim()
            self.out_layers = nn.ModuleList([TxlSoftmaxCluster(config.vocab_size, d_embed, not self.tie_weights)])
            has_proj = d_embed != config.d_model
        else:
            self.out_layers = nn.ModuleList(
                TxlSoftmaxCluster(end - start, width, not self.tie_weights) for start, end, width in self.clusters
            )
            has_proj = True
        # Which clusters reuse an input projection (never the head, as in the original code).
        self.shared_proj = [has_proj and i > 0 and config.proj_share_all_but_first for i in range(len(self.clusters))]
        self.out_projs = nn.ModuleDict(
            {
                str(i): nn.Linear(width, config.d_model, bias=False)
                for i, (_, _, width) in enumerate(self.clusters)
                if has_proj and not self.shared_proj[i]
            }
        )

    def _cluster_params(self, index: int, embedding: TxlAdaptiveEmbedding):
        """Weight ``[n_i, d_i]``, bias ``[n_i]`` and projection ``[d_model, d_i]`` (or None) of cluster ``index``."""
        start, end, _ = self.clusters[index]
        if self.div_val == 1:
            weight = embedding.emb_layers[0].weight if self.tie_weights else self.out_layers[0].weight
            weight, bias = weight[start:end], self.out_layers[0].bias[start:end]
            source = 0
        else:
            weight = embedding.emb_layers[index].weight if self.tie_weights else self.out_layers[index].weight
            bias, source = self.out_layers[index].bias, index
        if self.shared_proj[index]:
            proj = embedding.emb_projs[source].weight
        else:
            proj = self.out_projs[str(index)].weight if str(index) in self.out_projs else None
        return weight, bias, proj

    def forward(self, hidden: torch.Tensor, embedding: TxlAdaptiveEmbedding) -> torch.Tensor:
        """hidden ``[..., d_model]`` -> log-probabilities ``[..., V]``; ``embedding`` supplies the tied weights."""

        def logits(weight, bias, proj):
            projected = hidden if proj is None else F.linear(hidden, proj.t())  # h P: [..., d_i]
            return F.linear(projected, weight, bias)

        weight, bias, proj = self._cluster_params(0, embedding)
        if self.n_clusters:
            weight = torch.cat([weight, self.cluster_weight], dim=0)  # [S + n_clusters, d_0]
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        head = F.log_softmax(logits(weight, bias, proj), dim=-1)  # [..., S + n_clusters]
        pieces = [head[..., : self.shortlist_size]]
        for i in range(1, len(self.clusters)):
            tail = F.log_softmax(logits(*self._cluster_params(i, embedding)), dim=-1)  # [..., n_i]
            pieces.append(head[..., self.shortlist_size + i - 1, None] + tail)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]  # [..., V]

    def resize_tail(self, new_num_tokens: int, init_std: float) -> None:
        """Grow (or shrink) the last cluster's bias (and untied weight) to a vocabulary of ``new_num_tokens``."""
        start = 0 if self.div_val == 1 else self.clusters[-1][0]
        self.out_layers[-1].resize(new_num_tokens - start, init_std)
        self.clusters[-1] = (self.clusters[-1][0], new_num_tokens, self.clusters[-1][2])
        if len(self.clusters) == 1:
            self.shortlist_size = new_num_tokens


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class TxlModelOutput(ModelOutput):
    """Output of :class:`TxlModel`.

    last_hidden_state: ``[B, T, d_model]``.
    mems: :class:`TxlMems` to pass back as ``mems=`` (None when ``mem_len == 0`` or ``use_cache=False``).
    hidden_states: ``n_layer + 1`` tensors ``[B, T, d_model]`` when ``output_hidden_states``.
    attentions: ``n_layer`` tensors ``[B, H, T, K]`` when ``output_attentions``.
    """

    last_hidden_state: torch.Tensor | None = None
    mems: TxlMems | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TxlCausalLMOutput(ModelOutput):
    """Output of :class:`TxlForCausalLM`: ``loss`` (scalar, when labels are given), ``logits``
    ``[B, T, V]``, and the fields of :class:`TxlModelOutput`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mems: TxlMems | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TxlSequenceClassifierOutput(ModelOutput):
    """Output of :class:`TxlForSequenceClassification`: ``loss``, ``logits`` ``[B, num_labels]``, ``mems``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mems: TxlMems | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------
# Pretrained base and input checks
# ----------------------------------------------------------------------------------------------------


class TxlPreTrainedModel(PreTrainedModel):
    """Weight initialisation, Auto-class plumbing and attention-implementation support."""

    config_class = TxlConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["TxlLayer"]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # Attention reads `config._attn_implementation` at every call, so `set_attn_implementation("eager" |
        # "sdpa")` takes effect at once (transformers guesses otherwise from the module source).
        return True

    def _init_weights(self, module):
        """Linear and embedding weights ~ N(0, init_std), biases 0, LayerNorm (1, 0) via transformers'
        default; then the position biases u and v ~ N(0, init_std) as in the original code."""
        super()._init_weights(module)
        std = self.config.init_std
        if isinstance(module, nn.Linear):  # the base class reads `initializer_range` when a config has one
            init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "r_w_bias", None) is not None:
            init.normal_(module.r_w_bias, mean=0.0, std=std)
            init.normal_(module.r_r_bias, mean=0.0, std=std)
        if isinstance(module, TxlSoftmaxCluster):
            if module.weight is not None:
                init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        if isinstance(module, TxlAdaptiveLogSoftmax) and module.n_clusters:
            init.normal_(module.cluster_weight, mean=0.0, std=std)
            init.zeros_(module.cluster_bias)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize for the plain embedding. With adaptive embeddings (``config.uses_adaptive()``) only
        the **last cluster** can change size: ``new_num_tokens`` must stay above the last cutoff; its new rows are
        drawn from N(0, init_std) (biases 0) and the other clusters are untouched."""
        config = self.config
        if not config.uses_adaptive():
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        embedding = self.get_input_embeddings()
        if new_num_tokens is None:
            return embedding
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        last_start = config.cutoffs[-1] if config.cutoffs else 0
        if new_num_tokens <= last_start:
            raise NotImplementedError(
                f"resize_token_embeddings with adaptive embeddings only resizes the last cluster, which starts at "
                f"token {last_start} (cutoffs={config.cutoffs}); new_num_tokens={new_num_tokens} must be larger. "
                "Changing the other clusters needs new cutoffs and retraining."
            )
        embedding.resize_tail(new_num_tokens, config.init_std)
        head = getattr(self, "lm_head", None)
        if isinstance(head, TxlAdaptiveLogSoftmax):
            head.resize_tail(new_num_tokens, config.init_std)
        config.vocab_size = new_num_tokens
        return embedding


def _check_inputs(config, input_ids, inputs_embeds, attention_mask):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "Pass exactly one of `input_ids` ([batch, seq_len] token ids) and `inputs_embeds` "
            "([batch, seq_len, d_model]); got " + ("both." if input_ids is not None else "neither.")
        )
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must be batch-first [batch, seq_len], got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with `input_ids[None]`."
            )
        # A readable error for ids outside the vocabulary (on an accelerator the embedding would only raise a device
        # assert). Costs one small synchronisation per forward; skipped under torch.compile, where it would break the
        # graph.
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one synchronisation
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"`input_ids` contains ids outside the vocabulary [0, {config.vocab_size}): found values "
                    f"in [{low}, {high}]. Use the model's tokenizer, or resize the embeddings "
                    "with `model.resize_token_embeddings(len(tokenizer))`."
                )
        batch, qlen = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.d_model:
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq_len, d_model={config.d_model}], "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        batch, qlen = inputs_embeds.shape[:2]
    if qlen == 0:
        raise ValueError("The input has zero tokens (seq_len == 0); pass at least one token.")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, qlen):
        raise ValueError(
            f"`attention_mask` must have shape [batch, seq_len] = {[batch, qlen]} (the current segment only; "
            f"the memory remembers its own padding), got {list(attention_mask.shape)}."
        )
    return batch, qlen


def _as_mems(config, mems, batch, dtype, device) -> TxlMems | None:
    """Validate user memory and wrap it as :class:`TxlMems` (None for an empty memory)."""
    if mems is None:
        return None
    if not isinstance(mems, TxlMems):
        if not isinstance(mems, (list, tuple)) or not all(isinstance(m, torch.Tensor) for m in mems):
            raise ValueError("`mems` must be the `mems` of a previous output, or a list of tensors [B, M, d_model].")
        mems = TxlMems(mems)
    if len(mems) != config.n_layer:
        raise ValueError(f"`mems` has {len(mems)} layers but the model has n_layer={config.n_layer}.")
    d_model = config.d_model
    for layer, mem in enumerate(mems):
        if mem.dim() != 3 or mem.shape[0] != batch or mem.shape[2] != d_model:
            raise ValueError(
                f"`mems[{layer}]` has shape {tuple(mem.shape)}, expected [batch={batch}, M, d_model={config.d_model}]"
                " (batch-first). Pass the `mems` returned for a batch of the same size."
            )
        if mem.shape[1] != mems[0].shape[1]:
            raise ValueError(f"`mems[{layer}]` holds {mem.shape[1]} positions but `mems[0]` holds {mems[0].shape[1]}.")
        if mem.dtype != dtype:
            raise ValueError(
                f"`mems[{layer}]` has dtype {mem.dtype} but the model's hidden states are {dtype}; "
                f"convert with `mems.to({dtype})` or reset the memory."
            )
        if mem.device != device:
            raise ValueError(
                f"`mems[{layer}]` is on {mem.device} but the input is on {device}; move it with `mems.to(device)`."
            )
    if mems.padding_mask is not None and tuple(mems.padding_mask.shape) != (batch, mems.mem_len):
        raise ValueError(
            f"`mems.padding_mask` has shape {tuple(mems.padding_mask.shape)}, expected {(batch, mems.mem_len)}."
        )
    return mems if mems.mem_len > 0 else None


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


class TxlModel(TxlPreTrainedModel):
    """The Transformer-XL decoder stack: embeddings, ``n_layer`` relative-attention layers, memory update."""

    def __init__(self, config: TxlConfig):
        super().__init__(config)
        config.validate_txl()
        if config.uses_adaptive():
            self.word_emb = TxlAdaptiveEmbedding(config)
        else:
            self.word_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_scale = config.d_model**0.5  # applied here for both embeddings (and for `inputs_embeds`)
        self.drop = TxlDropout(config)
        if not config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # u, shared
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # v, shared
        self.layers = nn.ModuleList(TxlLayer(config) for _ in range(config.n_layer))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_emb

    def set_input_embeddings(self, new_embeddings):
        self.word_emb = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        mems: TxlMems | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TxlModelOutput | tuple:
        """Run one segment.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, d_model]``, the raw embedding
                lookup: the model applies the sqrt(d_model) scale to both).
            mems: the ``mems`` of the previous segment's output; None starts from an empty memory.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (left padding for generation).
                Padded keys are never attended, now or later through the memory.
            use_cache: return the updated memory (default: ``mem_len > 0``).
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = (use_cache if use_cache is not None else True) and config.mem_len > 0

        batch, qlen = _check_inputs(config, input_ids, inputs_embeds, attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.word_emb(input_ids)  # [B, T, d]
        hidden = inputs_embeds * self.emb_scale
        mems = _as_mems(config, mems, batch, hidden.dtype, hidden.device)
        if mems is None and config.legacy_zero_mems and config.mem_len > 0:
            # transformers 4.x: the first segment attends to `mem_len` zero vectors (see TxlConfig).
            mems = TxlMems([hidden.new_zeros(batch, config.mem_len, config.d_model)] * config.n_layer)
        mlen = 0 if mems is None else mems.mem_len
        klen = mlen + qlen

        # Keys each query may see: causal over [memory; segment], minus padding (memory's and current).
        key_is_real = _key_padding(mems, attention_mask, batch, qlen, hidden.device)  # [B, K] or None
        if key_is_real is None and sees_every_key(qlen, mlen, config.mem_len, config.same_length):
            allowed = None  # a generation step without padding: no mask to build or apply
        else:
            allowed = causal_memory_mask(qlen, mlen, config.mem_len, config.same_length, device=hidden.device)[None]
        if key_is_real is not None:
            # A padded query still sees itself, so that no softmax row is empty.
            diagonal = torch.eye(qlen, dtype=torch.bool, device=hidden.device)
            self_key = F.pad(diagonal, (mlen, 0))[None]  # [1, T, K]
            allowed = (allowed & key_is_real[:, None, :]) | self_key  # [B, T, K]

        # Inference caches (TxlMems.kv / r_head, in a _MemoryStore): only without gradients and in eval mode.
        cache_key = self._inference_cache_key(hidden) if use_cache else None
        store, kv_ready, r_heads, cache_klen = None, False, None, klen
        if cache_key is not None:
            fresh = mems is not None and mems.cache_key == cache_key
            if fresh and mems.r_head is not None and mems.r_head[0].shape[0] >= klen:
                r_heads = list(mems.r_head)
                cache_klen = r_heads[0].shape[0]
            else:  # cover the longest key length of the next calls too (one step of generation: mem_len + 1)
                cache_klen = max(klen, config.mem_len + qlen)
            store, start, kv_ready = self._memory_store(mems, fresh, batch, qlen, hidden)
            end = start + mlen  # this segment goes to [end, end + T) of the store

        pos_emb = None  # not needed when every layer reads its projection from the cache
        if r_heads is None:
            pos_emb = sinusoid_position_embedding(
                cache_klen, config.d_model, config.clamp_len, device=hidden.device, dtype=hidden.dtype
            )
            if cache_key is not None:
                r_heads = [layer.attn.r_proj(pos_emb) for layer in self.layers]  # [K', H*D] each
            pos_emb = pos_emb[-klen:]  # [K, d]
        if self.training:  # (in eval, skipping the no-op dropouts saves per-token overhead in generation)
            pos_emb = None if pos_emb is None else self.drop(pos_emb)
            hidden = self.drop(hidden)

        layer_inputs, all_attentions = [], []
        untie_r = config.untie_r
        for index, layer in enumerate(self.layers):
            layer_inputs.append(hidden)
            mem = None if mems is None else mems[index]
            r_w_bias = layer.attn.r_w_bias if untie_r else self.r_w_bias
            r_r_bias = layer.attn.r_r_bias if untie_r else self.r_r_bias
            kv_buffer, r_head = None, None
            if store is not None:
                store.hidden[index][:, end : end + qlen].copy_(hidden)
                kv_buffer = store.kv[index][:, start : end + qlen]  # [B, K, 2*H*D]
                r_head = r_heads[index][-klen:]  # distances K-1 .. 0
            args = (hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions)
            args += (kv_buffer, kv_ready, r_head)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():  # (no caches in training)
                hidden, probs = self._gradient_checkpointing_func(layer.__call__, *args)
            else:
                hidden, probs = layer(*args)
            if output_attentions:
                all_attentions.append(probs)
        if self.training:
            hidden = self.drop(hidden)

        new_mems = None
        if store is not None:  # (inference with use_cache) views of the store's last mem_len positions
            new_end = end + qlen
            new_start = max(start, new_end - config.mem_len)
            store.fill = new_end
            mask = None if key_is_real is None else key_is_real[:, new_start - new_end :]
            new_mems = TxlMems(
                [h[:, new_start:new_end] for h in store.hidden],
                mask,
                kv=[kv[:, new_start:new_end] for kv in store.kv],
                r_head=r_heads,
                cache_key=cache_key,
                store=store,
                store_end=new_end,
            )
        elif use_cache:
            new_mems = self._update_mems(layer_inputs, mems, key_is_real)
        hidden_states = tuple(layer_inputs) + (hidden,) if output_hidden_states else None
        attentions = tuple(all_attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden, new_mems, hidden_states, attentions) if v is not None)
        return TxlModelOutput(
            last_hidden_state=hidden, mems=new_mems, hidden_states=hidden_states, attentions=attentions
        )

    def _memory_store(self, mems, fresh, batch, qlen, hidden) -> tuple[_MemoryStore, int, bool]:
        """The store this inference step writes into, where the memory starts in it, and whether it already
        holds the memory's keys/values. The memory's own store when it can take ``qlen`` more positions in place,
        otherwise a new one the memory is copied into."""
        if fresh and mems.appendable(qlen):
            return mems.store, mems.store_end - mems.mem_len, True
        config = self.config
        mlen = 0 if mems is None else mems.mem_len
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        kv_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype  # what qkv_proj returns
        store = _MemoryStore.empty(
            config.n_layer,
            batch,
            max(mlen, config.mem_len) + max(qlen, -(-config.mem_len // 4)),  # room for T and for mem_len/4 more
            config.d_model,
            2 * config.n_head * config.d_head,
            hidden.dtype,
            kv_dtype,
            hidden.device,
        )
        kv_ready = False
        if mems is not None:
            kv_ready = fresh and mems.kv is not None and mems.kv[0].shape[:2] == (batch, mlen)
            for index in range(config.n_layer):
                store.hidden[index][:, :mlen].copy_(mems[index])
                if kv_ready:
                    store.kv[index][:, :mlen].copy_(mems.kv[index])
        store.fill = mlen
        return store, 0, kv_ready

    def _inference_cache_key(self, hidden) -> tuple | None:
        """What the inference caches depend on, or None when they must not be used (training, gradients).

        The caches hold projections of the memory and of R, so they are valid for the same projection weights
        (identity and in-place version: an optimizer step or ``load_state_dict`` invalidates them), dtype,
        device, autocast state and ``clamp_len``.
        """
        if self.training or torch.is_grad_enabled():
            return None
        params = []
        for layer in self.layers:
            attn = layer.attn
            params += [attn.qkv_proj.weight, attn.r_proj.weight]
            if attn.pre_lnorm:
                params += [attn.layer_norm.weight, attn.layer_norm.bias]
        try:
            versions = tuple((id(p), p._version) for p in params)
        except RuntimeError:  # inference tensors (a model built under inference_mode) have no version counter
            return None
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None
        return (versions, hidden.dtype, hidden.device, autocast, autocast_dtype, self.config.clamp_len)

    def _update_mems(self, layer_inputs, mems, key_is_real) -> TxlMems:
        """New memory of layer l: the last ``mem_len`` rows of ``[mems[l]; input of layer l]``, detached."""
        mem_len = self.config.mem_len
        hidden = []
        for index, current in enumerate(layer_inputs):
            # When the segment alone fills the memory, keep a view of it (no copy).
            fills = mems is None or current.shape[1] >= mem_len
            cat = current if fills else torch.cat([mems[index], current], dim=1)  # [B, K, d]
            hidden.append(cat[:, -mem_len:].detach())
        mask = None if key_is_real is None else key_is_real[:, -mem_len:]
        return TxlMems(hidden, mask)


def _key_padding(mems, attention_mask, batch, qlen, device):
    """``[B, K]`` bool (True = real token) over [memory; segment], or None when nothing is padded."""
    mem_mask = None if mems is None else mems.padding_mask
    if mem_mask is None and attention_mask is None:
        return None
    mlen = 0 if mems is None else mems.mem_len
    if mem_mask is None:
        mem_mask = torch.ones(batch, mlen, dtype=torch.bool, device=device)
    current = (
        torch.ones(batch, qlen, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    )
    return torch.cat([mem_mask.to(device), current.to(device)], dim=1)


def causal_lm_loss(logits, labels=None, shift_labels=None, num_items_in_batch=None, ignore_index=-100):
    """Mean next-token cross entropy (sum / ``num_items_in_batch`` when given).

    ``labels`` ``[B, T]`` are shifted inside (position t predicts ``labels[:, t+1]``), as in every
    transformers causal LM. A stream pipeline that already knows the next token of every position
    (no target lost at segment boundaries) passes ``shift_labels`` ``[B, T]`` instead.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)


class TxlForCausalLM(TxlPreTrainedModel, GenerationMixin):
    """Transformer-XL with a language-modelling head (tied to the input embeddings by default).

    ``generate()`` keeps the memory as its past state: after the prompt, each step feeds only the new token
    and the memory. With ``mem_len=0`` (or ``use_cache=False``) every step recomputes the whole sequence.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.word_emb.weight"}

    def __init__(self, config: TxlConfig):
        super().__init__(config)
        self.transformer = TxlModel(config)
        if config.uses_adaptive():
            # The adaptive softmax reads tied weights from the embedding at every call: nothing for transformers to tie.
            self._tied_weights_keys = {}
            self.lm_head = TxlAdaptiveLogSoftmax(config)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self):
        return None if isinstance(self.lm_head, TxlAdaptiveLogSoftmax) else self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        mems: TxlMems | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> TxlCausalLMOutput | tuple:
        """Arguments of :meth:`TxlModel.forward`, plus:

        labels: ``[B, T]`` targets shifted inside the model; ``-100`` is ignored.
        shift_labels: ``[B, T]`` targets already aligned (``shift_labels[:, t]`` follows ``input_ids[:, t]``).
        logits_to_keep: compute logits for the last ``logits_to_keep`` positions only (0 = all).

        With an adaptive softmax (``config.uses_adaptive()``) ``logits`` are the normalised log-probabilities
        ``[B, T, V]`` (materialised; ``softmax(logits)`` is still the distribution, so ``generate()`` is unchanged)
        and ``loss`` is their negative log-likelihood with the same shift / ``-100`` / ``shift_labels`` rules.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            mems=mems,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if isinstance(self.lm_head, TxlAdaptiveLogSoftmax):
            logits = self.lm_head(hidden, self.transformer.word_emb)  # log-probabilities [B, T, V]
        else:
            logits = self.lm_head(hidden)  # [B, T, V]
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, shift_labels, num_items_in_batch)
        if not return_dict:
            rest = (outputs.mems, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in (loss, logits, *rest) if v is not None)
        return TxlCausalLMOutput(
            loss=loss,
            logits=logits,
            mems=outputs.mems,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # --- generate() plumbing: the memory travels in model_kwargs["mems"] ---------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the past state is `mems`, not a transformers Cache

    def prepare_inputs_for_generation(
        self,
        input_ids,
        mems=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=None,
        next_sequence_length=None,
        is_first_iteration=False,
        **kwargs,
    ):
        """Once the memory holds the prefix, feed only the new token(s); without memory, the whole sequence."""
        model_inputs = {"mems": mems, "use_cache": use_cache}
        if inputs_embeds is not None and is_first_iteration:
            model_inputs["inputs_embeds"] = inputs_embeds
            qlen = inputs_embeds.shape[1]
        else:
            if mems is not None and next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            model_inputs["input_ids"] = input_ids
            qlen = input_ids.shape[1]
        decoding = mems is not None and not is_first_iteration
        if attention_mask is not None and not decoding:
            # Only the first call can carry padding: generated tokens are always real, and the memory already
            # remembers which earlier positions were padding. An all-ones mask is dropped (no mask to apply).
            attention_mask = attention_mask[:, -qlen:]
            model_inputs["attention_mask"] = None if bool(attention_mask.all()) else attention_mask
        for key in ("output_attentions", "output_hidden_states", "logits_to_keep", "return_dict"):
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs["mems"] = outputs.get("mems")
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        mems = model_kwargs.pop("mems", None)
        if mems is not None and expand_size > 1:
            mems = _as_mems(self.config, mems, mems[0].shape[0], mems[0].dtype, mems[0].device)
            mems = None if mems is None else mems.repeat_interleave(expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size,
            is_encoder_decoder=is_encoder_decoder,
            input_ids=input_ids,
            **model_kwargs,
        )
        model_kwargs["mems"] = mems
        return input_ids, model_kwargs

    def _reorder_cache(self, mems, beam_idx):
        """Beam search: keep the memory rows of the surviving beams."""
        if mems is None:
            return None
        if not isinstance(mems, TxlMems):
            mems = TxlMems(mems)
        return mems.index_select(beam_idx)


class TxlForSequenceClassification(TxlPreTrainedModel):
    """Transformer-XL with a linear classifier on the last non-padding token of each sequence."""

    def __init__(self, config: TxlConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = TxlModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        mems: TxlMems | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TxlSequenceClassifierOutput | tuple:
        """labels: ``[B]`` class ids (or floats for regression, ``[B, num_labels]`` for multi-label)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            mems=mems,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state  # [B, T, d]
        batch, qlen = hidden.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch, qlen, hidden.device)  # [B]
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])  # [B, num_labels]
        loss = self._loss(logits, labels) if labels is not None else None
        if not return_dict:
            rest = (outputs.mems, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in (loss, logits, *rest) if v is not None)
        return TxlSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            mems=outputs.mems,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _last_token_index(self, input_ids, attention_mask, batch, qlen, device):
        positions = torch.arange(qlen, device=device)
        if attention_mask is not None:
            real = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            return torch.full((batch,), qlen - 1, device=device)
        # Highest position holding a real token (works for left and right padding).
        return torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)

    def _loss(self, logits, labels):
        config = self.config
        if config.problem_type is None:
            if self.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = [
    "TxlAdaptiveEmbedding",
    "TxlAdaptiveLogSoftmax",
    "TxlForCausalLM",
    "TxlForSequenceClassification",
    "TxlMems",
    "TxlModel",
    "TxlPreTrainedModel",
    "causal_lm_loss",
    "rel_shift",
    "sinusoid_position_embedding",
]
