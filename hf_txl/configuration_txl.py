"""Configuration of hf_txl's Transformer-XL (Dai et al. 2019, https://arxiv.org/abs/1901.02860).

This file is shipped next to the weights by ``save_pretrained`` so that ``trust_remote_code`` users
can load a model without hf_txl installed: it imports nothing from hf_txl.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"TxlConfig: `{name}` must be a positive integer, got {value!r}.")


def _check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"TxlConfig: `{name}` is a dropout probability and must lie in [0, 1), got {value!r}.")


class TxlConfig(PretrainedConfig):
    r"""Configuration of a Transformer-XL language model.

    Field names are the paper's / original code's; transformers' standard names are aliases
    (``hidden_size`` -> ``d_model``, ``num_hidden_layers`` -> ``n_layer``,
    ``num_attention_heads`` -> ``n_head``). Defaults are the paper's enwik8 base model
    (12 layers, d_model 512, 8 heads of 64, d_inner 2048, memory 512; 204 byte symbols as in the original
    enwik8 preprocessing).

    Args:
        vocab_size: number of tokens.
        d_model: width of the residual stream (and of the embeddings).
        n_layer: number of Transformer-XL layers.
        n_head: attention heads per layer (H).
        d_head: width of one head (D). ``n_head * d_head`` need not equal ``d_model``: the output
            projection maps ``H * D`` back to ``d_model``, as in the original code.
        d_inner: hidden width of the position-wise feed-forward network.
        dropout: dropout on embeddings, position embeddings, attention output and feed-forward.
        dropatt: dropout on the attention probabilities.
        mem_len: number of past hidden states kept per layer (M). ``0`` disables the memory.
        clamp_len: relative distances larger than ``clamp_len`` use the embedding of ``clamp_len``;
            ``-1`` (or ``0``) disables clamping.
        same_length: every query attends to the same number of keys (``mem_len``), as in the paper's
            evaluation; needs ``mem_len > 0``.
        pre_lnorm: LayerNorm before each sub-layer (pre-norm) instead of after the residual sum
            (post-norm, the original default). As in the original code there is no final LayerNorm.
        untie_r: one pair of position biases u (``r_w_bias``) and v (``r_r_bias``) per layer (``True``)
            or one pair shared by all layers (``False``).
        tie_word_embeddings: share the input embedding matrix with the output projection.
        layer_norm_epsilon: LayerNorm epsilon.
        init_std: standard deviation of the normal initialisation of weights, embeddings, u and v.
        cutoffs: boundaries of the adaptive input / adaptive softmax clusters (Baevski & Auli 2019; Grave et al.
            2017), for word-level vocabularies. ``[c_1, ..., c_n]`` splits the vocabulary (sorted by frequency)
            into a head ``[0, c_1)`` and tails ``[c_i, c_{i+1})`` (the last ends at ``vocab_size``). Empty (the
            default): one embedding matrix and one full softmax.
        div_val: cluster i embeds its tokens in ``d_embed // div_val**i`` dimensions, projected to ``d_model``
            (``1``: every cluster uses ``d_embed``; then one matrix is shared and sliced by the clusters).
        d_embed: width of the (head) embeddings; ``None`` means ``d_model``. With ``d_embed != d_model`` or
            ``div_val > 1`` the embeddings are projected to ``d_model`` (and the hidden state back for the softmax).
        proj_share_all_but_first: the softmax projections of the tail clusters reuse the input-embedding
            projections (the head cluster keeps its own), as in the original code. The cluster weights themselves
            are shared with the input embeddings when ``tie_word_embeddings`` is set.
        legacy_zero_mems: start the first segment (``mems=None``) from ``mem_len`` zero vectors that **are**
            attended to, as the transformers 4.x ``transfo-xl`` port did, instead of the original code's empty
            memory. The zero keys still receive attention weight, so outputs differ from an empty memory on the
            first segment and, through the memory, after it (0.3 to 1.8 in log-probability on the random test
            models; about 1e-2 reported for trained ones). Set for checkpoints converted
            from transformers 4.x so that their outputs match from the first segment; leave it off otherwise.

    With any of ``cutoffs``, ``div_val > 1`` or ``d_embed != d_model`` the model uses an adaptive embedding and an
    adaptive log-softmax (:meth:`uses_adaptive`); ``TxlForCausalLM`` then returns **log-probabilities** (the full
    ``[B, T, V]`` matrix is materialised) in ``logits``.
    """

    model_type = "hf_txl"
    keys_to_ignore_at_inference = ["mems"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "n_token": "vocab_size",
    }

    def __init__(
        self,
        vocab_size: int = 204,
        d_model: int = 512,
        n_layer: int = 12,
        n_head: int = 8,
        d_head: int = 64,
        d_inner: int = 2048,
        dropout: float = 0.1,
        dropatt: float = 0.0,
        mem_len: int = 512,
        clamp_len: int = -1,
        same_length: bool = False,
        pre_lnorm: bool = False,
        untie_r: bool = True,
        tie_word_embeddings: bool = True,
        layer_norm_epsilon: float = 1e-5,
        init_std: float = 0.02,
        cutoffs: list[int] | None = None,
        div_val: int = 1,
        d_embed: int | None = None,
        proj_share_all_but_first: bool = False,
        legacy_zero_mems: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_head = d_head
        self.d_inner = d_inner
        self.dropout = dropout
        self.dropatt = dropatt
        self.mem_len = mem_len
        self.clamp_len = clamp_len
        self.same_length = same_length
        self.pre_lnorm = pre_lnorm
        self.untie_r = untie_r
        self.layer_norm_epsilon = layer_norm_epsilon
        self.init_std = init_std
        self.cutoffs = list(cutoffs) if cutoffs is not None else []
        self.div_val = div_val
        self.d_embed = d_embed
        self.proj_share_all_but_first = proj_share_all_but_first
        self.legacy_zero_mems = legacy_zero_mems
        self.validate_txl()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def validate_txl(self) -> None:
        """Raise ``ValueError`` naming the first invalid field. Also called by the model at construction."""
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner"):
            _check_positive_int(name, getattr(self, name))
        _check_probability("dropout", self.dropout)
        _check_probability("dropatt", self.dropatt)
        if isinstance(self.mem_len, bool) or not isinstance(self.mem_len, int) or self.mem_len < 0:
            raise ValueError(
                f"TxlConfig: `mem_len` must be an integer >= 0 (0 disables the memory), got {self.mem_len!r}."
            )
        if isinstance(self.clamp_len, bool) or not isinstance(self.clamp_len, int) or self.clamp_len < -1:
            raise ValueError(
                f"TxlConfig: `clamp_len` must be an integer >= -1 (-1 disables clamping), got {self.clamp_len!r}."
            )
        if self.same_length and self.mem_len == 0:
            raise ValueError(
                "TxlConfig: `same_length=True` makes every query attend to exactly `mem_len` keys and needs "
                "`mem_len > 0`; set `mem_len` or turn `same_length` off."
            )
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ValueError(f"TxlConfig: `layer_norm_epsilon` must be > 0, got {self.layer_norm_epsilon!r}.")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"TxlConfig: `init_std` must be > 0, got {self.init_std!r}.")
        self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        _check_positive_int("div_val", self.div_val)
        if self.d_embed is not None:
            _check_positive_int("d_embed", self.d_embed)
        cutoffs = self.cutoffs
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs) or any(
            not a < b for a, b in zip([0, *cutoffs], [*cutoffs, self.vocab_size])
        ):
            raise ValueError(
                f"TxlConfig: `cutoffs` must be strictly increasing integers in (0, vocab_size={self.vocab_size}), "
                f"got {cutoffs!r}."
            )
        if self.embed_dim() // self.div_val ** len(cutoffs) < 1:
            raise ValueError(
                f"TxlConfig: with `div_val={self.div_val}` the last of the {len(cutoffs) + 1} clusters would embed "
                f"in d_embed // div_val**{len(cutoffs)} = 0 dimensions; raise `d_embed` ({self.embed_dim()}) or lower "
                "`div_val`."
            )
        for name in ("proj_share_all_but_first", "legacy_zero_mems"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TxlConfig: `{name}` must be a bool, got {getattr(self, name)!r}.")

    def embed_dim(self) -> int:
        """Width of the (head cluster's) embeddings: ``d_embed``, or ``d_model`` when it is None."""
        return self.d_model if self.d_embed is None else self.d_embed

    def uses_adaptive(self) -> bool:
        """Adaptive embedding + adaptive log-softmax (clusters or projections) instead of one matrix each."""
        return bool(self.cutoffs) or self.div_val != 1 or self.embed_dim() != self.d_model


__all__ = ["TxlConfig"]
