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
      vectors that were attended to);
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

    Pass ``outputs.mems`` back as ``mems=`` to continue the recurrence. A plain list or tuple of tensors is
    accepted as well (every position is then taken as a real token).
    """

    def __init__(self, hidden: Sequence[torch.Tensor], padding_mask: torch.Tensor | None = None):
        self.hidden = tuple(hidden)
        self.padding_mask = padding_mask

    def __getitem__(self, index):
        return self.hidden[index]

    def __len__(self) -> int:
        return len(self.hidden)

    def __repr__(self) -> str:
        shape = tuple(self.hidden[0].shape) if self.hidden else ()
        return f"TxlMems(n_layer={len(self)}, shape={shape}, padded={self.padding_mask is not None})"

    @property
    def mem_len(self) -> int:
        """Number of positions held (M)."""
        return self.hidden[0].shape[1] if self.hidden else 0

    @property
    def batch_size(self) -> int:
        return self.hidden[0].shape[0]

    def index_select(self, index: torch.Tensor) -> TxlMems:
        """A new memory keeping batch rows ``index`` (beam search reorders its beams with this)."""
        hidden = [h.index_select(0, index.to(h.device)) for h in self.hidden]
        mask = None if self.padding_mask is None else self.padding_mask.index_select(0, index)
        return TxlMems(hidden, mask)

    def repeat_interleave(self, repeats: int) -> TxlMems:
        """Repeat every batch row ``repeats`` times (``num_return_sequences`` / ``num_beams`` expansion)."""
        hidden = [h.repeat_interleave(repeats, dim=0) for h in self.hidden]
        mask = None if self.padding_mask is None else self.padding_mask.repeat_interleave(repeats, dim=0)
        return TxlMems(hidden, mask)

    def to(self, *args, **kwargs) -> TxlMems:
        hidden = [h.to(*args, **kwargs) for h in self.hidden]
        mask = None
        if self.padding_mask is not None:
            mask = self.padding_mask.to(device=hidden[0].device)
        return TxlMems(hidden, mask)

    def detach(self) -> TxlMems:
        return TxlMems([h.detach() for h in self.hidden], self.padding_mask)


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


# ----------------------------------------------------------------------------------------------------
# Attention kernels: one eager reference, one SDPA path
# ----------------------------------------------------------------------------------------------------


def eager_rel_attention(q, k, v, position_scores, allowed, *, u, scale, dropout_p, training):
    """Reference relative attention.

    score(i, j) = [(q_i + u)·k_j  +  BD(i, j)] / sqrt(D)   with BD the rel-shifted position term,
    softmax over allowed keys, then a weighted sum of the values.

    q ``[B, H, T, D]``, k and v ``[B, H, K, D]``, position_scores ``[B, H, T, K]`` (unscaled BD),
    allowed ``[B|1, T, K]`` bool, u ``[H, D]``. Returns the attention output ``[B, H, T, D]`` and the
    probabilities ``[B, H, T, K]``.
    """
    content_scores = torch.matmul(q + u[:, None, :], k.transpose(-1, -2))  # AC: [B, H, T, K]
    scores = (content_scores + position_scores) * scale
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v), probs  # [B, H, T, D]


def sdpa_rel_attention(q, k, v, position_scores, allowed, *, u, scale, dropout_p, training):
    """Same maths through ``F.scaled_dot_product_attention``: the scaled position term BD / sqrt(D) plus the
    mask enter as an additive float ``attn_mask``. Same arguments as :func:`eager_rel_attention`."""
    bias = (position_scores * scale).masked_fill(~allowed[:, None], torch.finfo(position_scores.dtype).min)
    out = F.scaled_dot_product_attention(
        q + u[:, None, :],
        k,
        v,
        attn_mask=bias.to(q.dtype),
        dropout_p=dropout_p if training else 0.0,
        scale=scale,
    )
    return out, None


ATTENTION_FUNCTIONS = {"eager": eager_rel_attention, "sdpa": sdpa_rel_attention}


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
        self.drop = nn.Dropout(config.dropout)
        self.scaling = 1.0 / math.sqrt(config.d_head)
        self.pre_lnorm = config.pre_lnorm
        if config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # u
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))  # v

    def forward(self, hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions=False):
        """hidden ``[B, T, d]``, mem ``[B, M, d]`` or None, pos_emb ``[K, d]``, allowed ``[B|1, T, K]``."""
        batch, qlen, _ = hidden.shape
        cat = hidden if mem is None else torch.cat([mem, hidden], dim=1)  # [B, K, d]
        klen = cat.shape[1]
        if self.pre_lnorm:
            cat = self.layer_norm(cat)
        inner = self.n_head * self.d_head
        w_q, w_kv = self.qkv_proj.weight.split([inner, 2 * inner], dim=0)
        q = F.linear(cat[:, -qlen:], w_q)  # [B, T, H*D]
        k, v = F.linear(cat, w_kv).chunk(2, dim=-1)  # [B, K, H*D] each
        q = q.view(batch, qlen, self.n_head, self.d_head).transpose(1, 2)  # [B, H, T, D]
        k = k.view(batch, klen, self.n_head, self.d_head).transpose(1, 2)  # [B, H, K, D]
        v = v.view(batch, klen, self.n_head, self.d_head).transpose(1, 2)  # [B, H, K, D]
        r_k = self.r_proj(pos_emb).view(klen, self.n_head, self.d_head).permute(1, 2, 0)  # [H, D, K]

        # BD(i, c) = (q_i + v)·W_{k,R} R_{K-1-c}, then realigned so column j is key j.
        position_scores = rel_shift(torch.matmul(q + r_r_bias[:, None, :], r_k))  # [B, H, T, K]

        implementation = self.config._attn_implementation or "eager"
        if output_attentions:
            implementation = "eager"  # only the eager path materialises the probabilities
        attention = ATTENTION_FUNCTIONS.get(implementation, eager_rel_attention)
        out, probs = attention(
            q, k, v, position_scores, allowed,
            u=r_w_bias, scale=self.scaling, dropout_p=self.config.dropatt, training=self.training,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, qlen, inner)  # [B, T, H*D]
        out = self.drop(self.o_proj(out))
        out = hidden + out if self.pre_lnorm else self.layer_norm(hidden + out)
        return out, probs


class TxlFeedForward(nn.Module):
    """Position-wise ReLU feed-forward with residual: ``LN(h + FF(h))`` or, pre-norm, ``h + FF(LN(h))``."""

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_inner)
        self.fc_out = nn.Linear(config.d_inner, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.pre_lnorm = config.pre_lnorm

    def forward(self, hidden):
        x = self.layer_norm(hidden) if self.pre_lnorm else hidden
        x = self.drop(self.fc_out(self.drop(F.relu(self.fc_in(x)))))
        return hidden + x if self.pre_lnorm else self.layer_norm(hidden + x)


class TxlLayer(nn.Module):
    """One Transformer-XL decoder layer: relative attention then feed-forward."""

    def __init__(self, config: TxlConfig):
        super().__init__()
        self.attn = TxlRelAttention(config)
        self.ff = TxlFeedForward(config)

    def forward(self, hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions=False):
        hidden, probs = self.attn(hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions)
        return self.ff(hidden), probs


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
        if input_ids.numel():
            low, high = torch.aminmax(input_ids)
            if low.item() < 0 or high.item() >= config.vocab_size:
                raise ValueError(
                    f"`input_ids` contains ids outside the vocabulary [0, {config.vocab_size}): found values "
                    f"in [{low.item()}, {high.item()}]. Use the model's tokenizer, or resize the embeddings "
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
    for layer, mem in enumerate(mems):
        if mem.dim() != 3 or mem.shape[0] != batch or mem.shape[2] != config.d_model:
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
        self.word_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_scale = config.d_model**0.5
        self.drop = nn.Dropout(config.dropout)
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
        mlen = 0 if mems is None else mems.mem_len
        klen = mlen + qlen

        # Keys each query may see: causal over [memory; segment], minus padding (memory's and current).
        allowed = causal_memory_mask(qlen, mlen, config.mem_len, config.same_length, device=hidden.device)[None]
        key_is_real = _key_padding(mems, attention_mask, batch, qlen, hidden.device)  # [B, K] or None
        if key_is_real is not None:
            # A padded query still sees itself, so that no softmax row is empty.
            diagonal = torch.eye(qlen, dtype=torch.bool, device=hidden.device)
            self_key = F.pad(diagonal, (mlen, 0))[None]  # [1, T, K]
            allowed = (allowed & key_is_real[:, None, :]) | self_key  # [B, T, K]

        pos_emb = sinusoid_position_embedding(
            klen, config.d_model, config.clamp_len, device=hidden.device, dtype=hidden.dtype
        )
        pos_emb = self.drop(pos_emb)  # [K, d]
        hidden = self.drop(hidden)

        layer_inputs, all_attentions = [], []
        for index, layer in enumerate(self.layers):
            layer_inputs.append(hidden)
            mem = None if mems is None else mems[index]
            r_w_bias = layer.attn.r_w_bias if config.untie_r else self.r_w_bias
            r_r_bias = layer.attn.r_r_bias if config.untie_r else self.r_r_bias
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, probs = self._gradient_checkpointing_func(
                    layer.__call__, hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions
                )
            else:
                hidden, probs = layer(hidden, mem, pos_emb, allowed, r_w_bias, r_r_bias, output_attentions)
            if output_attentions:
                all_attentions.append(probs)
        hidden = self.drop(hidden)

        new_mems = self._update_mems(layer_inputs, mems, key_is_real) if use_cache else None
        hidden_states = tuple(layer_inputs) + (hidden,) if output_hidden_states else None
        attentions = tuple(all_attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden, new_mems, hidden_states, attentions) if v is not None)
        return TxlModelOutput(
            last_hidden_state=hidden, mems=new_mems, hidden_states=hidden_states, attentions=attentions
        )

    @torch.no_grad()
    def _update_mems(self, layer_inputs, mems, key_is_real) -> TxlMems:
        """New memory of layer l: the last ``mem_len`` rows of ``[mems[l]; input of layer l]``, detached."""
        mem_len = self.config.mem_len
        hidden = []
        for index, current in enumerate(layer_inputs):
            cat = current if mems is None else torch.cat([mems[index], current], dim=1)  # [B, K, d]
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
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

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
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask[:, -qlen:]
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
    "TxlForCausalLM",
    "TxlForSequenceClassification",
    "TxlMems",
    "TxlModel",
    "TxlPreTrainedModel",
    "causal_lm_loss",
    "rel_shift",
    "sinusoid_position_embedding",
]
