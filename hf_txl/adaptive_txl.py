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
"""Adaptive input (Baevski & Auli 2019) and the projected adaptive log-softmax (Grave et al. 2017) of the original
Transformer-XL code, for word-level vocabularies (``cutoffs``, ``div_val``, ``d_embed`` in :class:`TxlConfig`).

This file is shipped next to the weights by ``save_pretrained`` (``trust_remote_code`` without hf_txl): it imports only
torch and ``.configuration_txl``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_txl import TxlConfig


def full_precision_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a softmax or a loss is computed in: float32, or float64 for float64 inputs (never lower)."""
    return torch.promote_types(dtype, torch.float32)


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which ``torch.autocast`` is off on ``device_type`` (a no-op where autocast does not exist), so that
    operations run in the dtype of their inputs (mixed precision: the adaptive softmax and the loss in float32)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
    ``[N, V]`` matrix is materialised, which also gives every parameter a gradient, as DDP requires), computed in
    float32 even under mixed precision (see :meth:`forward`).
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
        """hidden ``[..., d_model]`` -> log-probabilities ``[..., V]``; ``embedding`` supplies the tied weights.

        Dtype contract: always computed in full precision, ``full_precision_dtype(hidden.dtype)`` (float32, float64
        for a float64 model), outside ``torch.autocast`` and with the weights cast to that dtype, so that under
        mixed precision (bf16 / fp16 autocast, or a bf16 model) the projections, the log-softmaxes and the loss taken
        from the result are float32. The returned log-probabilities have that dtype. In float32 nothing is cast.
        """
        dtype = full_precision_dtype(hidden.dtype)
        with autocast_disabled(hidden.device.type):
            return self._log_probs(hidden.to(dtype), embedding, dtype)

    def _log_probs(self, hidden: torch.Tensor, embedding: TxlAdaptiveEmbedding, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`forward` in ``dtype`` (``hidden`` has it; each parameter is cast to it, a no-op when equal)."""

        def logits(weight, bias, proj):
            projected = hidden if proj is None else F.linear(hidden, proj.to(dtype).t())  # h P: [..., d_i]
            return F.linear(projected, weight.to(dtype), bias.to(dtype))

        weight, bias, proj = self._cluster_params(0, embedding)
        if self.n_clusters:
            weight = torch.cat([weight.to(dtype), self.cluster_weight.to(dtype)], dim=0)  # [S + n_clusters, d_0]
            bias = torch.cat([bias.to(dtype), self.cluster_bias.to(dtype)], dim=0)
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


__all__ = ["TxlAdaptiveEmbedding", "TxlAdaptiveLogSoftmax", "TxlSoftmaxCluster"]
