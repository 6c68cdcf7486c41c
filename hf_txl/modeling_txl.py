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
"""Transformer-XL (Dai et al. 2019, https://arxiv.org/abs/1901.02860) as a transformers v5 model.

Notation used in shape comments:
    B batch, T tokens of the current segment, M memory length (tokens already processed and kept),
    K = M + T keys, H heads, D head width, d d_model, V vocabulary.

Public tensors are batch-first. Internally attention works in the ``[B, H, T, D]`` layout.

What is kept from the original code (kimiyoung/transformer-xl, ``attn_type=0``):
    * relative positional attention with a sinusoidal R, its own projection ``W_{k,R}`` and the
      biases u (``r_w_bias``) and v (``r_r_bias``), per layer or shared (``untie_r``);
    * segment-level recurrence: layer l attends over ``[memory_l; h_l]`` where ``memory_l`` holds the
      *inputs* of layer l at the last M positions, detached from the autograd graph (:class:`TxlCache`);
    * the first segment starts from an **empty** memory (the transformers 4.x port started from M zero
      vectors that were attended to; ``config.legacy_zero_mems`` reproduces that for converted checkpoints);
    * adaptive input and the projected adaptive log-softmax (``cutoffs``, ``div_val``, ``d_embed``) for word-level
      vocabularies; with them ``TxlForCausalLM.logits`` are log-probabilities;
    * post-norm by default, ReLU feed-forward, embeddings scaled by sqrt(d_model), no final LayerNorm.

Deliberate additions: an ``attention_mask`` for padded batches whose padding is remembered by the memory, SDPA and
flex_attention implementations of the eager reference (chosen by ``config._attn_implementation``), the memory as a
transformers ``Cache`` (``cache=``, alias ``mems=``), and a transformers-style ``loss`` / ``generate()``.

Layout, small to big: positions, masks, the attention reference, modules (dropout, attention, feed-forward, layer),
outputs, pretrained base, input checks, model, heads. This file holds the reference maths; ``kernels_txl.py`` holds
the kernel choices that compute the same with fewer passes or faster CPU kernels (the SDPA and flex_attention
implementations, CPU dropout, products of a few rows), and ``adaptive_txl.py`` the adaptive embedding and softmax
(word-level vocabularies). This file is shipped next to the weights by ``save_pretrained`` so that
``trust_remote_code`` users can load the model without hf_txl: it imports only torch, transformers and its siblings
``.configuration_txl``, ``.cache_txl``, ``.adaptive_txl`` and ``.kernels_txl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .adaptive_txl import (
    TxlAdaptiveEmbedding,
    TxlAdaptiveLogSoftmax,
    TxlSoftmaxCluster,
    autocast_disabled,
    full_precision_dtype,
)
from .cache_txl import TxlCache, resolve_cache
from .configuration_txl import TxlConfig
from .kernels_txl import (
    TXL_ATTENTION_FUNCTIONS,
    TxlAttentionInterface,
    align_cpu_parameters,
    dropout_function,
    inference_projection_dtype,
    project,
    sdpa_rel_attention,
)

# generate() settings that make transformers draft tokens and roll back the rejected ones (TxlCache.crop)
ASSISTED_DECODING_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit")

# ----------------------------------------------------------------------------------------------------
# Positions
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


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


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


def segment_mask(attention_mask, batch: int, qlen: int, seen: int) -> torch.Tensor | None:
    """The ``[B, T]`` mask of the current segment. ``attention_mask`` covers the segment (``[B, T]``) or, as
    transformers' ``generate()`` passes it, every token so far (``[B, seen + T]``); the memory remembers its own
    padding, so only the last T columns are read."""
    if attention_mask is None:
        return None
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or shape[1] not in (qlen, seen + qlen):
        raise ValueError(
            f"`attention_mask` must have shape [batch, seq_len] = {[batch, qlen]} (the current segment; the memory "
            f"remembers its own padding) or [batch, tokens so far + seq_len] = {[batch, seen + qlen]}, got "
            f"{list(shape)}."
        )
    return attention_mask[:, -qlen:]


def key_padding(memory_mask, segment_mask, batch, mlen, qlen, device) -> torch.Tensor | None:
    """``[B, M + T]`` bool (True = real token) over [memory; segment], or None when nothing is padded."""
    if memory_mask is None and segment_mask is None:
        return None
    if memory_mask is None:
        memory_mask = torch.ones(batch, mlen, dtype=torch.bool, device=device)
    if segment_mask is None:
        segment_mask = torch.ones(batch, qlen, dtype=torch.bool, device=device)
    return torch.cat([memory_mask.to(device), segment_mask.to(device).bool()], dim=1)


def allowed_keys(qlen, mlen, config, key_is_real, device) -> torch.Tensor | None:
    """Keys each query may see ``[B|1, T, K]``: causal over [memory; segment], minus padding; None when every query
    sees every key (a generation step without padding: no mask to build or apply)."""
    if key_is_real is None and sees_every_key(qlen, mlen, config.mem_len, config.same_length):
        return None
    allowed = causal_memory_mask(qlen, mlen, config.mem_len, config.same_length, device=device)[None]  # [1, T, K]
    if key_is_real is not None:
        # A padded query still sees itself, so that no softmax row is empty.
        self_key = F.pad(torch.eye(qlen, dtype=torch.bool, device=device), (mlen, 0))[None]  # [1, T, K]
        allowed = (allowed & key_is_real[:, None, :]) | self_key  # [B, T, K]
    return allowed


# ----------------------------------------------------------------------------------------------------
# Attention: the reference (its SDPA and flex_attention implementations are in kernels_txl.py)
# ----------------------------------------------------------------------------------------------------


def eager_rel_attention(module, query, key, value, position_head, allowed, *, u, v, scaling, dropout=0.0, **kwargs):
    r"""The paper's relative attention score (Dai et al. 2019, Sec. 3.3), the reference for every other implementation:

        A_{i,j} = q_i·k_j + q_i·W_{k,R} R_{i-j} + u·k_j + v·W_{k,R} R_{i-j}
                = (q_i + u)·k_j  +  (q_i + v)·W_{k,R} R_{i-j}
                =       AC       +         BD

    scaled by 1/sqrt(D), softmax over the allowed keys, then a weighted sum of the values. BD is computed for every
    relative distance with one matmul and realigned to keys by :func:`rel_shift`.

    query ``[B, H, T, D]``, key and value ``[B, H, K, D]``, position_head ``[H, K, D]`` (W_{k,R} R for distances
    K-1 .. 0), allowed ``[B|1, T, K]`` bool (None: every key), u and v ``[H, D]``. Returns the output ``[B, T, H, D]``
    and the probabilities ``[B, H, T, K]``.
    """
    r_k = position_head.transpose(1, 2)  # [H, D, K]
    content_scores = torch.matmul(query + u[:, None, :], key.transpose(-1, -2))  # AC: [B, H, T, K]
    position_scores = rel_shift(torch.matmul(query + v[:, None, :], r_k))  # BD: [B, H, T, K], column j is key j
    scores = (content_scores + position_scores) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs  # [B, T, H, D]


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


class TxlDropout(nn.Dropout):
    """``nn.Dropout`` computed with the dropout of the attention implementation (``kernels_txl.dropout_function``:
    its fast CPU dropout for ``"sdpa"``, ``F.dropout`` for the eager reference)."""

    def __init__(self, config: TxlConfig):
        super().__init__(config.dropout)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_function(self.config._attn_implementation)(x, self.p, self.training)


class TxlRelAttention(nn.Module):
    """Multi-head relative attention over ``[memory; segment]`` with its residual and LayerNorm.

    ``qkv_proj`` holds W_q, W_k, W_v stacked (the original ``qkv_net``); queries are projected for the T
    segment positions only, keys and values for all K positions. ``r_proj`` is W_{k,R}.
    """

    def __init__(self, config: TxlConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
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

    def forward(self, hidden_states, memory, position_embeddings, allowed, r_w_bias, r_r_bias, cache=None, **kwargs):
        """hidden_states ``[B, T, d]``, memory ``[B, M, d]`` or None, position_embeddings R ``[K', d]`` for distances
        ``K'-1 .. 0`` (None when the cache has the projection), allowed ``[B|1, T, K]`` or None (every key). ``cache``
        (inference only) supplies the memory's projected keys/values and position term. Returns the output
        ``[B, T, d]`` and the attention probabilities (eager) or None."""
        batch, qlen, _ = hidden_states.shape
        inner = self.n_head * self.d_head
        x = self.layer_norm(hidden_states) if self.pre_lnorm else hidden_states
        query, key_value = project(self.qkv_proj, x).split([inner, 2 * inner], dim=-1)  # [B, T, H*D], [B, T, 2*H*D]
        # The memory is projected apart from the segment: it needs no input gradient, and during inference the cache
        # keeps its projection.
        if cache is not None:  # the store keeps them head-major: [B, H, K, D] with each head's positions contiguous
            key, value = cache.update(key_value, self.layer_idx, self.project_memory)
        else:
            if memory is not None and memory.shape[1]:
                key_value = torch.cat([self.project_memory(memory), key_value], dim=1)  # [B, K, 2*H*D]
            key, value = key_value.view(batch, -1, 2, self.n_head, self.d_head).unbind(2)  # [B, K, H, D] each
            key, value = key.transpose(1, 2), value.transpose(1, 2)  # [B, H, K, D]
        klen = key.shape[2]
        if cache is not None:
            position_head = cache.position_head(
                self.layer_idx, klen, lambda: self.split_position_heads(self.r_proj(position_embeddings)).to(key.dtype)
            )  # [H, K, D], in the cache's dtype
        else:
            position_head = self.split_position_heads(self.r_proj(position_embeddings[-klen:]))  # [H, K, D]
        query = query.view(batch, qlen, self.n_head, self.d_head).transpose(1, 2)  # [B, H, T, D]
        if r_w_bias is None:  # this layer's own u, v (untie_r), read inside it, where FSDP has gathered them
            r_w_bias, r_r_bias = self.r_w_bias, self.r_r_bias
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation or "eager"
        if key.dtype != query.dtype and implementation != "sdpa":  # a float32 cache (inference_projection_dtype)
            key, value, position_head = key.to(query.dtype), value.to(query.dtype), position_head.to(query.dtype)
        attention = TXL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_rel_attention)
        out, probs = attention(
            self, query, key, value, position_head, allowed,
            u=r_w_bias, v=r_r_bias, scaling=self.scaling, dropout=self.dropatt if self.training else 0.0,
            reference=eager_rel_attention,
        )  # fmt: skip
        out = project(self.o_proj, out.reshape(batch, qlen, inner))
        if self.training:  # (skipping the eval no-op saves per-token overhead in generation)
            out = self.drop(out)
        out = hidden_states + out if self.pre_lnorm else self.layer_norm(hidden_states + out)
        return out, probs

    def split_position_heads(self, position_head: torch.Tensor) -> torch.Tensor:
        """``W_{k,R} R`` ``[K, H*D]`` -> ``[H, K, D]`` (a view)."""
        return position_head.view(position_head.shape[0], self.n_head, self.d_head).transpose(0, 1)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory's keys and values ``[B, M, 2*H*D]``."""
        inner = self.n_head * self.d_head
        return F.linear(self.layer_norm(memory) if self.pre_lnorm else memory, self.qkv_proj.weight[inner:])


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
        x = F.relu(project(self.fc_in, x))
        if self.training:
            x = self.drop(x)
        x = project(self.fc_out, x)
        if self.training:
            x = self.drop(x)
        return hidden + x if self.pre_lnorm else self.layer_norm(hidden + x)


class TxlLayer(GradientCheckpointingLayer):
    """One Transformer-XL layer: relative attention then feed-forward.

    The memory is an explicit (positional) argument besides the cache: gradient checkpointing hides the cache from a
    layer and replays it in the backward pass, which must then see the same memory. The cache is only passed during
    inference (it holds projections; the model writes the new memory after the last layer)."""

    def __init__(self, config: TxlConfig, layer_idx: int):
        super().__init__()
        self.attn = TxlRelAttention(config, layer_idx)
        self.ff = TxlFeedForward(config)

    def forward(self, hidden_states, memory, position_embeddings, allowed, r_w_bias, r_r_bias, cache=None, **kwargs):
        hidden_states, _ = self.attn(
            hidden_states, memory, position_embeddings, allowed, r_w_bias, r_r_bias, cache=cache, **kwargs
        )
        return self.ff(hidden_states)


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class TxlModelOutput(ModelOutput):
    """Output of :class:`TxlModel`.

    last_hidden_state: ``[B, T, d_model]``.
    cache: the :class:`TxlCache` to pass back as ``cache=`` (None when ``mem_len == 0`` or ``use_cache=False``);
        ``mems`` is the same object.
    hidden_states: ``n_layer + 1`` tensors ``[B, T, d_model]`` with ``output_hidden_states``.
    attentions: ``n_layer`` tensors ``[B, H, T, K]`` with ``output_attentions``.
    """

    last_hidden_state: torch.Tensor | None = None
    cache: TxlCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def mems(self) -> TxlCache | None:
        """The memory under its original name (the same object as ``cache``)."""
        return self.cache


@dataclass
class TxlCausalLMOutput(ModelOutput):
    """Output of :class:`TxlForCausalLM`: ``loss`` (scalar, when labels are given), ``logits``
    ``[B, T, V]``, and the fields of :class:`TxlModelOutput` (``mems`` is ``cache``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: TxlCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def mems(self) -> TxlCache | None:
        return self.cache


@dataclass
class TxlSequenceClassifierOutput(ModelOutput):
    """Output of :class:`TxlForSequenceClassification`: ``loss``, ``logits`` ``[B, num_labels]``, ``cache``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: TxlCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def mems(self) -> TxlCache | None:
        return self.cache


# ----------------------------------------------------------------------------------------------------
# Pretrained base
# ----------------------------------------------------------------------------------------------------


class TxlPreTrainedModel(PreTrainedModel):
    """Weight initialisation, Auto-class plumbing and attention-implementation support."""

    config_class = TxlConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True  # flex_rel_attention
    _no_split_modules = ["TxlLayer"]
    _can_record_outputs = {"hidden_states": TxlLayer, "attentions": TxlRelAttention}

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # Attention reads `config._attn_implementation` at every call, so `set_attn_implementation("eager" | "sdpa" |
        # "flex_attention")` takes effect at once (transformers guesses otherwise from the module source).
        return True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, then :func:`align_cpu_parameters`: safetensors maps CPU weights at
        addresses 8 bytes past a 64-byte boundary, and the CPU kernels of a generation step
        (``kernels_txl.project``) round differently there. Aligned, a loaded model computes bit for bit what the
        saved one did."""
        loaded = super().from_pretrained(*args, **kwargs)
        align_cpu_parameters(loaded[0] if isinstance(loaded, tuple) else loaded)  # (model, loading_info) on request
        return loaded

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


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def check_inputs(config, input_ids, inputs_embeds) -> tuple[int, int]:
    """``(B, T)`` of the segment, or a ``ValueError`` naming the bad argument and the fix."""
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
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(
                f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}; convert with `.long()` (or "
                "pass float embeddings as `inputs_embeds`)."
            )
        check_token_ids("input_ids", input_ids, config.vocab_size)
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
    return batch, qlen


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """A readable error for ids outside the vocabulary (on an accelerator the embedding or the loss would only raise
    a device-side assert). One small synchronisation; skipped under torch.compile, where it would break the graph."""
    if not ids.numel() or torch.compiler.is_compiling():
        return
    if ignore_index is not None:
        ids = torch.where(ids == ignore_index, 0, ids)
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one synchronisation
    if low < 0 or high >= vocab_size:
        allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index} (ignored)")
        raise ValueError(
            f"`{name}` contains ids outside the vocabulary {allowed}: found values in [{low}, {high}]. Use the "
            "model's tokenizer, or resize the embeddings with `model.resize_token_embeddings(len(tokenizer))`."
        )


# ----------------------------------------------------------------------------------------------------
# Model
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
        self.layers = nn.ModuleList(TxlLayer(config, index) for index in range(config.n_layer))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_emb

    def set_input_embeddings(self, new_embeddings):
        self.word_emb = new_embeddings

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: TxlCache | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mems: TxlCache | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> TxlModelOutput:
        """Run one segment.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, d_model]``, the raw embedding
                lookup: the model applies the sqrt(d_model) scale to both).
            cache: the memory (a previous output's ``cache``), updated in place and returned; None starts from an
                empty memory.
            attention_mask: ``[B, T]`` (or ``[B, tokens so far + T]``), 1 for real tokens and 0 for padding (left
                padding for generation). Padded keys are never attended, now or later through the memory.
            use_cache: return the updated memory (default ``config.use_cache``; never with ``mem_len == 0``).
            mems: the paper's name for the memory, an alias of ``cache`` that is left as it was (the output holds a
                new one), so one memory can be continued twice. Give ``cache`` or ``mems``, not both.
        """
        config = self.config
        use_cache = (config.use_cache if use_cache is None else use_cache) and config.mem_len > 0
        batch, qlen = check_inputs(config, input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.word_emb(input_ids)  # [B, T, d]
        hidden = inputs_embeds * self.emb_scale
        memory = resolve_cache(config, cache, mems, batch, hidden.dtype, hidden.device)
        if not use_cache and memory is cache:
            memory = memory.fork()  # read, not updated
        segment = segment_mask(attention_mask, batch, qlen, memory.get_seq_length())
        if memory.is_empty and config.legacy_zero_mems and config.mem_len > 0:
            # transformers 4.x: the first segment attends to `mem_len` zero vectors (see TxlConfig).
            memory.set_memory([hidden.new_zeros(batch, config.mem_len, config.d_model)] * config.n_layer)
        mlen = memory.mem_len
        key_is_real = key_padding(memory.padding_mask, segment, batch, mlen, qlen, hidden.device)  # [B, K] or None
        allowed = allowed_keys(qlen, mlen, config, key_is_real, hidden.device)

        cache_key = self._inference_cache_key(hidden) if use_cache else None  # projections kept during inference
        memory.begin_segment(
            qlen, key_is_real, mem_len=config.mem_len, cache_key=cache_key, like=hidden,
            heads=(config.n_head, config.d_head),
            kv_dtype=inference_projection_dtype(hidden, self._projection_dtype(hidden), config._attn_implementation),
        )  # fmt: skip
        position_rows = memory.position_length(mlen + qlen)
        position_embeddings = None  # R [K', d]: not needed when every layer has its projection cached
        if position_rows:
            position_embeddings = sinusoid_position_embedding(
                position_rows, config.d_model, config.clamp_len, device=hidden.device, dtype=hidden.dtype
            )
        if self.training:  # (in eval, skipping the no-op dropouts saves per-token overhead in generation)
            position_embeddings = None if position_embeddings is None else self.drop(position_embeddings)
            hidden = self.drop(hidden)

        layer_cache = memory if cache_key is not None else None
        layer_inputs = []
        for index, layer in enumerate(self.layers):
            layer_inputs.append(hidden)
            r_w_bias = None if config.untie_r else self.r_w_bias  # None: the layer's own (see TxlRelAttention)
            r_r_bias = None if config.untie_r else self.r_r_bias
            hidden = layer(
                hidden, memory[index], position_embeddings, allowed, r_w_bias, r_r_bias, cache=layer_cache, **kwargs
            )
        if self.training:
            hidden = self.drop(hidden)
        if use_cache:
            memory.end_segment(layer_inputs)
        return TxlModelOutput(last_hidden_state=hidden, cache=memory if use_cache else None)

    def _projection_dtype(self, hidden) -> torch.dtype:
        """What the projections return: the autocast dtype under autocast, else the hidden states' dtype."""
        device_type = hidden.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype

    def _inference_cache_key(self, hidden) -> tuple | None:
        """What the inference caches depend on, or None when they must not be used (training, gradients, tracing).

        The caches hold projections of the memory and of R, so they are valid for the same projection weights
        (identity and in-place version: an optimizer step or ``load_state_dict`` invalidates them), dtype,
        device, autocast state and ``clamp_len``.
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
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
        autocast = torch.is_autocast_enabled(hidden.device.type)
        return (versions, hidden.dtype, hidden.device, autocast, self._projection_dtype(hidden), self.config.clamp_len)


# ----------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------


class TxlForCausalLM(TxlPreTrainedModel, GenerationMixin):
    """Transformer-XL with a language-modelling head (tied to the input embeddings by default).

    ``generate()`` keeps the memory as its past state (a :class:`TxlCache`): after the prompt, each step feeds only
    the new token. With ``mem_len=0`` (or ``use_cache=False``) every step recomputes the whole sequence.
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: TxlCache | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        mems: TxlCache | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> TxlCausalLMOutput:
        """Arguments of :meth:`TxlModel.forward`, plus:

        labels: ``[B, T]`` targets shifted inside the loss (position t predicts ``labels[:, t+1]``); ``-100`` is
            ignored. Or ``shift_labels`` ``[B, T]``, already aligned (``shift_labels[:, t]`` follows
            ``input_ids[:, t]``: a stream pipeline loses no target at segment boundaries). ``num_items_in_batch``
            normalises a summed loss (gradient accumulation). Both go to ``self.loss_function``.
        logits_to_keep: compute logits for the last ``logits_to_keep`` positions only (0 = all).

        With an adaptive softmax (``config.uses_adaptive()``) ``logits`` are the normalised log-probabilities
        ``[B, T, V]`` (materialised; ``softmax(logits)`` is still the distribution, so ``generate()`` is unchanged)
        and ``loss`` is their negative log-likelihood with the same rules.

        Mixed precision (``torch.autocast`` bf16 / fp16, e.g. ``accelerate launch --mixed_precision bf16``): the
        plain head's ``logits`` have the autocast dtype, the adaptive softmax's are float32 (computed in float32,
        see :class:`TxlAdaptiveLogSoftmax`); ``loss`` is always taken on float32 logits and is float32.
        """
        shift_labels = kwargs.get("shift_labels")
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            if targets is not None:
                self._check_targets(name, targets, input_ids if input_ids is not None else inputs_embeds)
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels.contiguous()  # (the loss views it flat)
        outputs = self.transformer(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, mems=mems, **kwargs,
        )  # fmt: skip
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if isinstance(self.lm_head, TxlAdaptiveLogSoftmax):
            logits = self.lm_head(hidden, self.transformer.word_emb)  # log-probabilities [B, T, V], float32
        else:
            logits = project(self.lm_head, hidden)  # [B, T, V], the autocast dtype under autocast
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self._lm_loss(logits, labels, **kwargs)
        return TxlCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """``self.loss_function`` (``labels`` or ``shift_labels`` in ``kwargs``) on the logits upcast to
        ``full_precision_dtype`` (float32; float64 for a float64 model) and outside ``torch.autocast``: under mixed
        precision the logits may be bf16 / fp16, the cross-entropy and the returned loss are float32. transformers'
        ``ForCausalLMLoss`` upcasts too; doing it here holds for any ``loss_function``. In float32 nothing is cast."""
        with autocast_disabled(logits.device.type):
            logits = logits.to(full_precision_dtype(logits.dtype))
            return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

    def _check_targets(self, name, targets, inputs) -> None:
        if tuple(targets.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"`{name}` must have the shape of `input_ids` [batch, seq_len] = {list(inputs.shape[:2])}, got "
                f"{list(targets.shape)}."
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"`{name}` must hold integer token ids, got dtype {targets.dtype}.")
        check_token_ids(name, targets, self.config.vocab_size, ignore_index=-100)

    # --- generate(): the memory travels as the Cache ------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, *args, mems=None, **kwargs):
        """transformers' ``generate()``, with the memory as its cache.

        A memory passed as ``cache=`` (updated in place) or ``mems=`` (left as it was) holds the text before
        ``inputs``: as in :meth:`forward`, ``inputs`` are the tokens that follow it, and ``attention_mask`` may cover
        them only (the memory's positions are taken as real: it remembers its own padding). The memory is repeated
        for ``num_beams`` / ``num_return_sequences``.

        ``inputs_embeds`` ``[B, T, d_model]`` (the raw embedding lookup, as for :meth:`forward`) stand for the prompt
        in the first call, which also follow a given memory; the memory then carries them and each step feeds only
        the new token. As for GPT-2, the returned sequences hold the new tokens only, or ``input_ids`` and the new
        tokens when both are given.

        Assisted decoding (``assistant_model=``, ``prompt_lookup_num_tokens=``) rolls rejected drafts back with
        :meth:`TxlCache.crop`, which needs the positions that slid out of the memory: the memory then records them
        from the start (transformers asks for that on the empty cache it makes, before hf_txl's replaces it). An
        assistant's own calls follow transformers' convention instead of hf_txl's: ``input_ids`` are the whole text,
        of which the memory holds the first ``cache.get_seq_length()`` tokens.
        """
        if self.config.mem_len == 0:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "generate(inputs_embeds=...) needs the memory to carry the prompt past the first step, and this "
                    "model has mem_len=0: pass the prompt as token ids (`inputs`) instead."
                )
            kwargs["use_cache"] = False  # no memory, no cache: every step recomputes the whole sequence
        if mems is not None:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the memory as `cache=` or as `mems=` (its alias), not both.")
            kwargs["cache"] = mems.fork() if isinstance(mems, TxlCache) else TxlCache(list(mems))
        config = generation_config or self.generation_config
        if self.config.mem_len and self._assisted_decoding_role(config, kwargs):
            if kwargs.get("cache") is None:
                kwargs["cache"] = TxlCache(n_layer=self.config.n_layer)
            kwargs["cache"].activate_past_recording()
            if getattr(config, "is_assistant", False):  # the whole text: transformers feeds what follows the memory
                return super().generate(inputs, generation_config, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("inputs_embeds") is not None:
            prompt = kwargs["inputs_embeds"]  # [B, T, d_model]: what the first call reads
        cache, mask = kwargs.get("cache"), kwargs.get("attention_mask")
        seen = cache.get_seq_length() if isinstance(cache, TxlCache) else 0
        if prompt is not None and mask is not None:
            segment_mask(mask, prompt.shape[0], prompt.shape[1], seen)  # a ValueError naming the shapes
        if prompt is not None and seen:
            batch, qlen = prompt.shape[:2]
            mask = torch.ones(batch, qlen, dtype=torch.long, device=prompt.device) if mask is None else mask
            if mask.shape[1] == qlen:  # transformers' convention: the mask covers every token so far
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, seen), mask], dim=1)
            expand = max(kwargs.get("num_beams", config.num_beams) or 1,
                         kwargs.get("num_return_sequences", config.num_return_sequences) or 1)  # fmt: skip
            if expand > 1 and cache.batch_size == batch:
                cache.batch_repeat_interleave(expand)
        return super().generate(inputs, generation_config, *args, **kwargs)

    @staticmethod
    def _assisted_decoding_role(config, kwargs) -> bool:
        """Whether this ``generate()`` call drafts for a model (an assistant's) or checks drafts (assisted)."""
        if getattr(config, "is_assistant", False) or kwargs.get("assistant_model") is not None:
            return True
        return any(kwargs.get(name, getattr(config, name, None)) for name in ASSISTED_DECODING_SETTINGS)

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, inputs_embeds=None,
        is_first_iteration=False, **kwargs,
    ):  # fmt: skip
        """transformers' preparation. ``inputs_embeds`` go whole to the first call only: like ids, they are the tokens
        that follow the memory (transformers would cut the memory's length off their front). The attention mask goes
        only to the first call (generated tokens are always real, and the memory remembers earlier padding), and an
        all-ones mask not even there."""
        if inputs_embeds is not None and is_first_iteration:
            next_sequence_length = None
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )  # fmt: skip
        mask = inputs.get("attention_mask")
        if mask is not None and (not is_first_iteration or bool(mask.all())):
            inputs["attention_mask"] = None
        return inputs


class TxlForSequenceClassification(TxlPreTrainedModel):
    """Transformer-XL with a linear classifier on the last non-padding token of each sequence."""

    def __init__(self, config: TxlConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = TxlModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: TxlCache | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mems: TxlCache | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> TxlSequenceClassifierOutput:
        """labels: ``[B]`` class ids (or floats for regression, ``[B, num_labels]`` for multi-label)."""
        outputs = self.transformer(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, mems=mems, **kwargs,
        )  # fmt: skip
        hidden = outputs.last_hidden_state  # [B, T, d]
        batch, qlen = hidden.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch, qlen, hidden.device)  # [B]
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits.float(), config=self.config)
        return TxlSequenceClassifierOutput(
            loss=loss, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip

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


__all__ = [
    "TXL_ATTENTION_FUNCTIONS",
    "TxlAdaptiveEmbedding",
    "TxlAdaptiveLogSoftmax",
    "TxlAttentionInterface",
    "TxlForCausalLM",
    "TxlForSequenceClassification",
    "TxlModel",
    "TxlPreTrainedModel",
    "eager_rel_attention",
    "rel_shift",
    "sdpa_rel_attention",
    "sinusoid_position_embedding",
]
