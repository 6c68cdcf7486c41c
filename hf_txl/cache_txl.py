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
"""The Transformer-XL memory as a transformers ``Cache``.

Layer l's memory holds the *inputs* of layer l at the last M positions already processed (Dai et al. 2019, Sec. 3.2):
the next segment's keys and values attend over ``[memory; segment]``. The memory is detached, truncated to
``mem_len``, starts empty, and remembers which of its positions were padding.

:class:`TxlCache` follows the transformers ``Cache`` protocol (``get_seq_length``, ``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``, ``crop``, ``reset``) so that ``generate()`` can carry it, and is
a registered pytree node so that ``torch.export`` can. The model updates it in place, one call per layer
(:meth:`TxlCache.update`), between :meth:`TxlCache.begin_segment` and :meth:`TxlCache.end_segment`.

During inference (eval mode, no gradient) the memory also keeps the projected keys/values of its positions and the
projected position terms, in a preallocated :class:`MemoryStore` written in place. Training never uses them. They are
derived data (the projections of the memory by the current weights), not part of the cache's value: they live in
slotted objects, outside every ``__dict__``, so that what attribute walkers see (transformers' exporters compare eager
and exported outputs that way) is what the pytree flattening carries: the memory and its padding mask.

This file is shipped next to the weights by ``save_pretrained`` (``trust_remote_code`` without hf_txl): it imports only
torch and transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from transformers.cache_utils import Cache, CacheLayerMixin

# ----------------------------------------------------------------------------------------------------
# Storage for inference
# ----------------------------------------------------------------------------------------------------


class MemoryStore:
    """Preallocated inference storage: per layer, hidden states ``[B, C, d_model]`` and projected keys/values
    ``[2, B, H, C, D]`` (keys then values, head-major: one head's positions are contiguous, so a generation step's
    attention streams them) for ``C`` (capacity) positions, and which positions are real tokens (``real`` ``[B, C]``,
    None while none is padding).

    A segment whose memory is ``[end - M, end)`` writes its T positions at ``[end, end + T)``, attends to the
    contiguous view ``[end - M, end + T)`` and leaves the memory ``[end + T - mem_len, end + T)``: views, no copy.
    Every position before a memory's end holds its own earlier tokens, so ``crop`` can move the end back.

    Only the store's newest memory (``version``) may write after itself, and never below ``protected`` (the end of
    a memory that :meth:`TxlCache.fork` shares): an older memory, or one cropped below a shared one, is copied into a
    new store instead of overwriting what another memory shows. Capacity ``mem_len + max(T, ceil(mem_len / 4))``: a
    generation step copies a quarter of a position per step on average.

    Slotted (no ``__dict__``): an eager output's cache then shows the same tensors as an exported program's.
    """

    __slots__ = ("hidden", "kv", "real", "capacity", "version", "protected", "shared")

    def __init__(self, hidden: list[torch.Tensor], kv: list[torch.Tensor]):
        self.hidden, self.kv = hidden, kv
        self.real: torch.Tensor | None = None
        self.capacity = hidden[0].shape[1]
        self.version = 0
        self.protected = 0
        self.shared = False  # whether a fork (another TxlCache) may read this store

    @staticmethod
    def layer_buffers(batch, capacity, d_model, heads, dtype, kv_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's empty hidden states ``[B, C, d_model]`` and keys/values ``[2, B, H, C, D]`` (heads: (H, D))."""
        n_head, d_head = heads
        hidden = torch.empty(batch, capacity, d_model, dtype=dtype, device=device)
        return hidden, torch.empty(2, batch, n_head, capacity, d_head, dtype=kv_dtype, device=device)

    @classmethod
    def empty(cls, n_layer, batch, capacity, d_model, heads, dtype, kv_dtype, device) -> MemoryStore:
        buffers = [cls.layer_buffers(batch, capacity, d_model, heads, dtype, kv_dtype, device) for _ in range(n_layer)]
        return cls([hidden for hidden, _ in buffers], [kv for _, kv in buffers])

    def write_padding(self, start: int, key_is_real: torch.Tensor | None) -> None:
        """Record which of the positions ``[start, start + width)`` are real tokens."""
        if key_is_real is None and self.real is None:
            return
        if self.real is None:
            self.real = torch.ones(self.hidden[0].shape[:2], dtype=torch.bool, device=self.hidden[0].device)
        width = self.real.shape[1] - start if key_is_real is None else key_is_real.shape[1]
        self.real[:, start : start + width] = True if key_is_real is None else key_is_real


class LayerProjections:
    """A layer's inference-only projections (see :class:`TxlMemoryLayer`), slotted like :class:`MemoryStore`."""

    __slots__ = ("kv", "r_head")

    def __init__(self):
        self.kv: torch.Tensor | None = None
        self.r_head: torch.Tensor | None = None


class TxlMemoryLayer(CacheLayerMixin):
    """One layer's memory: ``hidden`` ``[B, M, d_model]`` (None while empty) and, during inference, ``kv``
    ``[2, B, H, M, D]`` (its projected keys, then values) and ``r_head`` ``[H, K', D]`` (``W_{k,R} R`` for distances
    ``K'-1 .. 0``, head-major; any shorter key length reads its last positions). ``kv`` and ``r_head`` are kept in a
    slotted :class:`LayerProjections`, outside the layer's ``__dict__`` (see the module docstring)."""

    is_croppable = True

    def __init__(self, hidden: torch.Tensor | None = None):
        super().__init__()
        self.hidden = hidden
        self.projections = LayerProjections()
        self.is_initialized = hidden is not None

    @property
    def kv(self) -> torch.Tensor | None:
        return self.projections.kv

    @kv.setter
    def kv(self, value: torch.Tensor | None) -> None:
        self.projections.kv = value

    @property
    def r_head(self) -> torch.Tensor | None:
        return self.projections.r_head

    @r_head.setter
    def r_head(self, value: torch.Tensor | None) -> None:
        self.projections.r_head = value

    def __repr__(self) -> str:
        shape = None if self.hidden is None else tuple(self.hidden.shape)
        return f"TxlMemoryLayer(hidden={shape}, cached={self.kv is not None})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("A Transformer-XL memory is written by TxlCache.end_segment, not from keys/values.")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("A Transformer-XL memory is updated through TxlCache.update(...).")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Positions held (M)."""
        return 0 if self.hidden is None else self.hidden.shape[1]

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.hidden, self.kv, self.r_head = None, None, None
        self.is_initialized = False


# ----------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------


class TxlCache(Cache):
    """The recurrent memory of every layer, as a transformers ``Cache``.

    ``cache[l]`` (and iteration) gives layer l's memory ``[B, M, d_model]``, so code written for the original ``mems``
    list keeps working; ``padding_mask`` ``[B, M]`` (True = real token; None when every position is real) remembers
    padding after it moved into the memory. ``get_seq_length()`` is the number of tokens processed so far (what
    ``generate()`` counts), ``mem_len`` the number of positions held.

    Build one empty with ``TxlCache(config=model.config)`` (or let the model do it), or from tensors with
    ``TxlCache([m_0, ..., m_{L-1}], padding_mask)``. Passed as ``cache=``, the model updates it in place and returns
    it as ``outputs.cache``; passed as ``mems=`` (the original name), the model leaves it as it was and returns a new
    one, so one memory can be continued twice.
    """

    is_compileable = False

    def __init__(
        self,
        hidden: Sequence[torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        config=None,
        n_layer: int | None = None,
        seen_tokens: int | None = None,
    ):
        if hidden is None and config is None and n_layer is None:
            raise ValueError(
                "TxlCache needs the memory tensors (one [B, M, d_model] per layer), `config=` or `n_layer=`."
            )
        if hidden is None:
            n_layer = config.get_text_config(decoder=True).num_hidden_layers if n_layer is None else n_layer
            layers = [TxlMemoryLayer() for _ in range(n_layer)]
        else:
            layers = [TxlMemoryLayer(h) for h in hidden]
        super().__init__(layers=layers)
        self.padding_mask = padding_mask if hidden is not None else None
        self.seen_tokens = self.mem_len if seen_tokens is None else seen_tokens
        self.cache_key: tuple | None = None  # what the inference caches were computed with (see TxlModel)
        self.mem_len_limit = self.mem_len  # the model's mem_len, set at every segment
        self._step: dict | None = None  # what begin_segment prepared for update / end_segment
        self.record_past = False  # (assisted decoding) keep every position of the store when moving to a new one
        # Inference store: the memory is store positions [store_end - M, store_end); `store_version` says whether it
        # is the store's newest memory.
        self._drop_store()

    # --- the memory as a sequence of tensors ---------------------------------------------------------------------

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.layers[index].hidden

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (layer.hidden for layer in self.layers)

    def __repr__(self) -> str:
        shape = None if self.is_empty else tuple(self.layers[0].hidden.shape)
        return (
            f"TxlCache(n_layer={len(self)}, shape={shape}, seen_tokens={self.seen_tokens}, "
            f"padded={self.padding_mask is not None}, cached={self.kv is not None})"
        )

    @property
    def is_empty(self) -> bool:
        return self.mem_len == 0

    @property
    def mem_len(self) -> int:
        """Number of positions held (M)."""
        return 0 if not self.layers or self.layers[0].hidden is None else self.layers[0].hidden.shape[1]

    @property
    def hidden(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)

    @property
    def kv(self) -> tuple[torch.Tensor, ...] | None:
        """Per layer, the memory's projected keys and values ``[2, B, H, M, D]`` (inference only), else None."""
        kv = [layer.kv for layer in self.layers]
        return None if not kv or any(k is None for k in kv) else tuple(kv)

    @property
    def r_head(self) -> tuple[torch.Tensor, ...] | None:
        """Per layer, the projected position terms ``[H, K', D]`` for distances ``K'-1 .. 0`` (inference only)."""
        heads = [layer.r_head for layer in self.layers]
        return None if not heads or any(h is None for h in heads) else tuple(heads)

    @property
    def batch_size(self) -> int:
        return -1 if self.is_empty else self.layers[0].hidden.shape[0]

    # --- the transformers Cache protocol -------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far (the memory holds the last ``mem_len`` of them)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # any number of tokens: the memory slides

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.mem_len + query_length, 0

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` can roll back the last tokens: inference memories keep them in their store."""
        return self.store is not None or self.is_empty

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.padding_mask, self.seen_tokens, self.cache_key = None, 0, None
        self._drop_store()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the memory rows of the surviving beams."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (``num_return_sequences`` / ``num_beams`` expansion)."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (assisted decoding rolls back rejected drafts with this).

        As for transformers' dynamic caches the count is negative (or 0: nothing to do). The memory goes back to
        what it held before those tokens, which needs the positions that slid out of it since: the inference store
        keeps every position since it was allocated, and all of them while recording the past (see
        :class:`MemoryStore`).
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"TxlCache.crop({tokens_to_remove}): pass a negative number, the count of tokens to remove."
            )
        remove = -tokens_to_remove
        if remove == 0:
            return
        if remove > self.seen_tokens:
            raise ValueError(f"TxlCache.crop: cannot remove {remove} tokens, only {self.seen_tokens} were processed.")
        if self.store is None:
            raise ValueError(
                "TxlCache.crop needs the inference store, which keeps the positions that slid out of the memory; it "
                "exists for memories computed in eval mode without gradients (model.eval(), torch.no_grad())."
            )
        new_end = self.store_end - remove
        new_start = new_end - min(self.mem_len_limit, self.seen_tokens - remove)
        if new_start < 0:
            raise ValueError(
                f"TxlCache.crop: removing {remove} tokens needs positions this memory no longer keeps (it keeps "
                f"{self.store_end - self.mem_len} beyond the memory); generate() keeps them all for assisted decoding."
            )
        self.seen_tokens -= remove
        self._point_into_store(new_start, new_end)

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """Keep every position when the memory moves to a new store, so that ``crop`` can go back any number of
        tokens (``generate()`` calls this for assisted decoding; ``recurrent_states_to_keep``, transformers' bound on
        the rollback, is not needed: every position is kept)."""
        self.record_past = True

    # --- copies --------------------------------------------------------------------------------------------------

    def fork(self) -> TxlCache:
        """A new cache object showing the same memory (tensors shared, not copied); updating the fork leaves this one
        as it was."""
        other = TxlCache.__new__(TxlCache)
        other.__dict__.update(self.__dict__)
        other.layers = []
        for layer in self.layers:
            copy = TxlMemoryLayer(layer.hidden)
            copy.kv, copy.r_head = layer.kv, layer.r_head
            other.layers.append(copy)
        other._step = None
        if self.store is not None:  # both now show positions below store_end: neither may overwrite them
            self.store.protected = max(self.store.protected, self.store_end)
            self.store.shared = True
        return other

    def index_select(self, index: torch.Tensor) -> TxlCache:
        """A new memory keeping batch rows ``index``."""
        other = self.fork()
        other.reorder_cache(index)
        return other

    def repeat_interleave(self, repeats: int) -> TxlCache:
        other = self.fork()
        other.batch_repeat_interleave(repeats)
        return other

    def to(self, *args, **kwargs) -> TxlCache:
        """Move / convert the memory. The inference caches are kept when neither device nor dtype change, and
        dropped otherwise (the model recomputes them on the next call)."""
        if self.is_empty:
            return self.fork()
        hidden = [h.to(*args, **kwargs) for h in self]
        if hidden[0].dtype == self[0].dtype and hidden[0].device == self[0].device:
            return self.fork()
        mask = None if self.padding_mask is None else self.padding_mask.to(device=hidden[0].device)
        return TxlCache(hidden, mask, seen_tokens=self.seen_tokens)

    def detach(self) -> TxlCache:
        other = self.fork()
        for layer in other.layers:
            layer.hidden = None if layer.hidden is None else layer.hidden.detach()
        return other

    def without_cache(self) -> TxlCache:
        """The same memory without the inference caches (keys/values, position terms, store)."""
        other = self.fork()
        for layer in other.layers:
            layer.kv, layer.r_head = None, None
        other.cache_key = None
        other._drop_store()
        return other

    def set_memory(self, hidden: Sequence[torch.Tensor], padding_mask: torch.Tensor | None = None) -> None:
        """Replace the memory by ``hidden`` (one ``[B, M, d_model]`` per layer), keeping the token count."""
        for layer, tensor in zip(self.layers, hidden, strict=True):
            layer.hidden, layer.kv, layer.r_head, layer.is_initialized = tensor, None, None, True
        self.padding_mask, self.cache_key = padding_mask, None
        self._drop_store()

    # --- what the model calls, once per segment and once per layer ----------------------------------------------

    def begin_segment(self, qlen: int, key_is_real: torch.Tensor | None, *, mem_len: int, cache_key: tuple | None,
                      like: torch.Tensor, heads: tuple[int, int], kv_dtype: torch.dtype) -> None:  # fmt: skip
        """Prepare to process ``qlen`` new tokens. ``key_is_real`` ``[B, M + T]`` (or None) is the padding over
        [memory; segment]. ``cache_key`` (None in training) enables the inference caches: the memory's keys/values
        are then reused from the store, and the segment is written after them in place. ``heads``: (H, D)."""
        mlen = self.mem_len
        self.mem_len_limit = mem_len
        self._step = {"qlen": qlen, "key_is_real": key_is_real, "store": cache_key is not None}
        fresh = cache_key is not None and self.cache_key == cache_key
        self.cache_key = cache_key
        if cache_key is None:
            return
        if not fresh:
            for layer in self.layers:
                layer.kv, layer.r_head = None, None
        if not (fresh and self._appendable(qlen)):
            self._copy_into_new_store(max(mlen, mem_len) + max(qlen, -(-mem_len // 4)), like, heads, kv_dtype)
        self._step["start"] = self.store_end - mlen
        self._step["kv_ready"] = self.kv is not None
        self.store.version += 1  # from now on only this memory may write after itself
        self.store_version = self.store.version
        self.store.write_padding(self._step["start"], key_is_real)

    def update(
        self, key_value_states: torch.Tensor, layer_idx: int, project_memory: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference only (a segment begun with a ``cache_key``): keys and values over [memory; segment], each
        ``[B, H, M + T, D]``, for layer ``layer_idx``, given the segment's own ``key_value_states`` ``[B, T, 2*H*D]``
        (keys then values, as the projection writes them); ``project_memory(memory)`` projects the memory's
        ``[B, M, 2*H*D]`` when they are not cached yet. The results are views of the store, where the segment's are
        written in place."""
        layer, step = self.layers[layer_idx], self._step
        start, end = step["start"], self.store_end
        store = self.store.kv[layer_idx]  # [2, B, H, C, D]
        buffer = store[:, :, :, start : end + step["qlen"]]  # [2, B, H, M + T, D]
        if end > start and not step["kv_ready"]:
            buffer[:, :, :, : end - start].copy_(heads_first(project_memory(layer.hidden), store.shape))
        buffer[:, :, :, end - start :].copy_(heads_first(key_value_states, store.shape))
        return buffer[0], buffer[1]

    def position_length(self, klen: int) -> int:
        """How many rows of R (distances ``n-1 .. 0``) the model must build for :meth:`position_head`: ``klen``
        without inference caches, 0 when every layer has its projection cached, else enough for the next calls too."""
        if self._step is None or not self._step["store"]:
            return klen
        heads = self.r_head
        if heads is not None and heads[0].shape[1] >= klen:
            return 0
        return max(klen, self.mem_len_limit + self._step["qlen"])

    def position_head(self, layer_idx: int, klen: int, project: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Inference only: ``W_{k,R} R`` for distances ``klen-1 .. 0``, ``[H, K, D]``; ``project()`` computes it
        ``[H, K', D]`` from the R the model built (:meth:`position_length` rows). It is kept head-major
        (contiguous), and sliced by the next calls."""
        layer = self.layers[layer_idx]
        if layer.r_head is None or layer.r_head.shape[1] < klen:
            layer.r_head = project().contiguous()
        return layer.r_head[:, -klen:]

    def end_segment(self, layer_inputs: Sequence[torch.Tensor]) -> None:
        """Make the memory the last ``mem_len`` positions of ``[memory; layer input]`` of every layer, detached."""
        step, self._step = self._step, None
        qlen, mem_len, key_is_real = step["qlen"], self.mem_len_limit, step["key_is_real"]
        self.seen_tokens += qlen
        if step["store"]:
            end = self.store_end
            for index, current in enumerate(layer_inputs):
                self.store.hidden[index][:, end : end + qlen].copy_(current)
            self._point_into_store(max(step["start"], end + qlen - mem_len), end + qlen)
            return
        for layer, current in zip(self.layers, layer_inputs):
            # When the segment alone fills the memory, keep a view of it (no copy).
            fills = layer.hidden is None or current.shape[1] >= mem_len
            joined = current if fills else torch.cat([layer.hidden, current], dim=1)  # [B, M + T, d]
            layer.hidden, layer.kv = joined[:, -mem_len:].detach(), None
            layer.is_initialized = True
        self.padding_mask = None if key_is_real is None else key_is_real[:, -mem_len:]
        self._drop_store()

    # --- internals -----------------------------------------------------------------------------------------------

    def _appendable(self, qlen: int) -> bool:
        store = self.store
        return (
            store is not None
            and store.version == self.store_version
            and store.protected <= self.store_end
            and self.store_end + qlen <= store.capacity
        )

    def _copy_into_new_store(self, capacity, like, heads, kv_dtype) -> None:
        """Move the memory (with its cached keys/values when there are, and with every earlier position of the store
        when recording the past) to the start of a new store.

        Layer by layer: unless a fork shares the old store, each layer's old buffers are released once copied (they
        live on while something else holds a view of them), so the move needs one layer's buffers beyond the memory
        instead of a second store. If it fails midway the memory is intact (each layer in one store or the other) and
        the next segment builds a store afresh."""
        mlen, batch, d_model = self.mem_len, like.shape[0], like.shape[-1]
        keep = self.store_end if self.record_past and self.store is not None else mlen  # positions to move
        capacity = capacity + (keep - mlen) + (keep if self.record_past else 0)
        keep_kv = self.kv is not None
        old, begin, end = self.store, self.store_end - keep, self.store_end
        release = old is not None and not old.shared
        hidden, kv = [], []
        try:
            for index, layer in enumerate(self.layers):
                new_hidden, new_kv = MemoryStore.layer_buffers(
                    batch, capacity, d_model, heads, like.dtype, kv_dtype, like.device
                )
                if mlen:
                    new_hidden[:, :keep].copy_(layer.hidden if keep == mlen else old.hidden[index][:, begin:end])
                    layer.hidden = new_hidden[:, keep - mlen : keep]
                    if keep_kv:
                        source = layer.kv if keep == mlen else old.kv[index][:, :, :, begin:end]
                        new_kv[:, :, :, :keep].copy_(source)
                        layer.kv = new_kv[:, :, :, keep - mlen : keep]
                hidden.append(new_hidden)
                kv.append(new_kv)
                if release:
                    old.hidden[index], old.kv[index] = None, None
        except BaseException:
            self._drop_store()
            raise
        store = MemoryStore(hidden, kv)
        padding = self.padding_mask if keep == mlen or old.real is None else old.real[:, begin:end]
        store.write_padding(0, padding)
        self.store, self.store_end, self.store_version = store, keep, store.version
        self._point_into_store(keep - mlen, keep, keep_kv=keep_kv)

    def _point_into_store(self, start: int, end: int, keep_kv: bool = True) -> None:
        """Make the memory the store positions ``[start, end)``."""
        for index, layer in enumerate(self.layers):
            layer.hidden = self.store.hidden[index][:, start:end]
            layer.kv = self.store.kv[index][:, :, :, start:end] if keep_kv else None
            layer.is_initialized = True
        real = self.store.real
        self.padding_mask = None if real is None else real[:, start:end]
        self.store_end = end

    def _drop_store(self) -> None:
        self.store, self.store_end, self.store_version = None, 0, -1

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-row operation to the memory and its caches (copies: the store is left behind)."""
        if self.is_empty:
            return
        for layer in self.layers:
            layer.hidden = fn(layer.hidden)
            layer.kv = None if layer.kv is None else fn(layer.kv.transpose(0, 1)).transpose(0, 1)  # batch is dim 1
        if self.padding_mask is not None:
            self.padding_mask = fn(self.padding_mask)
        self._drop_store()


def heads_first(key_value: torch.Tensor, store_shape: torch.Size) -> torch.Tensor:
    """Keys and values as projected, ``[B, T, 2*H*D]``, as the store's layout ``[2, B, H, T, D]`` (a view)."""
    _, _, n_head, _, d_head = store_shape
    batch, length, _ = key_value.shape
    return key_value.view(batch, length, 2, n_head, d_head).permute(2, 0, 3, 1, 4)


# ----------------------------------------------------------------------------------------------------
# The memory a forward call reads
# ----------------------------------------------------------------------------------------------------


def resolve_cache(config, cache, mems, batch, dtype, device) -> TxlCache:
    """The memory to read and update: ``cache`` itself (updated in place), a fork of ``mems`` (left as it was), or a
    new empty one. Shapes, dtype and device are checked against the segment."""
    if cache is not None and mems is not None:
        raise ValueError("Pass the memory as `cache=` or as `mems=` (its alias), not both.")
    given, name = (cache, "cache") if mems is None else (mems, "mems")
    if given is None or (isinstance(given, Cache) and not isinstance(given, TxlCache) and not given.get_seq_length()):
        return TxlCache(n_layer=config.n_layer)  # e.g. the empty DynamicCache that generate() starts with
    if isinstance(given, (list, tuple)) and all(isinstance(m, torch.Tensor) for m in given):
        given = TxlCache(list(given))
    elif not isinstance(given, TxlCache):
        raise ValueError(
            f"`{name}` must be the `cache` of a previous output (a TxlCache) or a list of tensors [B, M, d_model]; "
            f"got {type(given).__name__}."
        )
    elif name == "mems":
        given = given.fork()
    check_cache(config, given, name, batch, dtype, device)
    return given


def check_cache(config, cache: TxlCache, name: str, batch: int, dtype, device) -> None:
    """A ``ValueError`` naming the problem when ``cache`` does not fit the model or the segment."""
    if len(cache) != config.n_layer:
        raise ValueError(f"`{name}` has {len(cache)} layers but the model has n_layer={config.n_layer}.")
    if cache.is_empty:
        return
    for layer, mem in enumerate(cache):
        if mem is None or mem.dim() != 3 or mem.shape[0] != batch or mem.shape[2] != config.d_model:
            shape = None if mem is None else tuple(mem.shape)
            raise ValueError(
                f"`{name}[{layer}]` has shape {shape}, expected [batch={batch}, M, d_model={config.d_model}] "
                "(batch-first). Pass the memory returned for a batch of the same size."
            )
        if mem.shape[1] != cache[0].shape[1]:
            raise ValueError(f"`{name}[{layer}]` holds {mem.shape[1]} positions but `{name}[0]` holds {cache.mem_len}.")
        if mem.dtype != dtype:
            raise ValueError(
                f"`{name}[{layer}]` has dtype {mem.dtype} but the model's hidden states are {dtype}; "
                f"convert with `{name}.to({dtype})` or reset the memory."
            )
        if mem.device != device:
            raise ValueError(
                f"`{name}[{layer}]` is on {mem.device} but the input is on {device}; move it with `{name}.to(device)`."
            )
    if cache.padding_mask is not None and tuple(cache.padding_mask.shape) != (batch, cache.mem_len):
        raise ValueError(
            f"`{name}.padding_mask` has shape {tuple(cache.padding_mask.shape)}, expected {(batch, cache.mem_len)}."
        )


# ----------------------------------------------------------------------------------------------------
# torch.export support: the cache is a pytree of its memory tensors
# ----------------------------------------------------------------------------------------------------


def _flatten(cache: TxlCache):
    # The context must be static (an exported program compares it at every call), so the token count is not in it:
    # an unflattened cache counts the positions it holds.
    hidden = [layer.hidden for layer in cache.layers]
    return [hidden, cache.padding_mask], [len(cache.layers)]


def _flatten_with_keys(cache: TxlCache):
    children, context = _flatten(cache)
    return [(pytree.MappingKey("hidden"), children[0]), (pytree.MappingKey("padding_mask"), children[1])], context


def _unflatten(children, context) -> TxlCache:
    hidden, padding_mask = children
    if any(h is None for h in hidden):
        return TxlCache(n_layer=context[0])
    return TxlCache(hidden, padding_mask)


def register_pytree() -> None:
    """Register :class:`TxlCache` as a pytree node (idempotent), as transformers does for its own caches."""
    if TxlCache in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        TxlCache,
        _flatten,
        _unflatten,
        serialized_type_name=f"{TxlCache.__module__}.{TxlCache.__name__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )


register_pytree()

__all__ = ["MemoryStore", "TxlCache", "TxlMemoryLayer", "check_cache", "resolve_cache"]
