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
"""Configuration of hf_txl's Transformer-XL (Dai et al. 2019, https://arxiv.org/abs/1901.02860).

This file is shipped next to the weights by ``save_pretrained`` so that ``trust_remote_code`` users
can load a model without hf_txl installed: it imports only from transformers, huggingface_hub and the
standard library.
"""

# No `from __future__ import annotations`: `@strict` checks values against the field annotations, and
# string annotations would switch those checks off.
from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig
from transformers.utils.type_validators import interval

# Field metadata key: the rule a field's value must follow, worded for error messages ("a positive integer").
_RULE = "txl_rule"


class TxlConfigFieldError(StrictDataclassFieldValidationError, ValueError):
    """A field of a :class:`TxlConfig` has an invalid type or value.

    Both huggingface_hub's strict-dataclass error (what ``@strict`` configs raise) and a ``ValueError`` (what
    hf_txl documents), so that ``except ValueError`` and ``except StrictDataclassError`` both catch it.
    """

    def __init__(self, message: str):
        Exception.__init__(self, message)


class TxlConfigClassError(StrictDataclassClassValidationError, ValueError):
    """Fields of a :class:`TxlConfig` are individually valid but inconsistent (e.g. ``same_length`` without memory).

    Both huggingface_hub's strict-dataclass error and a ``ValueError``, as :class:`TxlConfigFieldError`.
    """

    def __init__(self, message: str):
        Exception.__init__(self, message)


def _ranged(rule: str, default: Any, **bounds: Any) -> Any:
    """A field checked by transformers' ``interval(**bounds)``; ``rule`` words the requirement for error messages."""
    return interval(**bounds)(default=default, metadata={_RULE: rule})


def _positive_int(default: int) -> Any:
    return _ranged("a positive integer", default, min=1)


def _none_or_positive(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"must be None or >= 1, got {value!r}")


def _field_error(config: Any, name: str, value: Any, cause: BaseException) -> TxlConfigFieldError:
    """The error for ``name=value``: the field's rule, and the value's type when that was what failed."""
    config_field = config.__dataclass_fields__[name]  # (only dataclass fields have validators)
    annotation = config_field.type
    rule = config_field.metadata.get(_RULE) or (
        "a bool" if annotation is bool else f"of type {getattr(annotation, '__name__', annotation)}"
    )
    got = f"{value!r} ({type(value).__name__})" if isinstance(cause, TypeError) else repr(value)
    return TxlConfigFieldError(f"TxlConfig: `{name}` must be {rule}, got {got}.")


def _raise_value_errors(cls: type) -> type:
    """Make the checks that ``@strict`` installed on ``cls`` raise :class:`TxlConfigFieldError` /
    :class:`TxlConfigClassError` (``ValueError`` subclasses) with hf_txl's messages.

    huggingface_hub's own ``StrictDataclassFieldValidationError`` and ``StrictDataclassClassValidationError`` derive
    from ``Exception`` only. Apply on top of ``@strict``; a subclass decorated with ``@strict`` again needs it too.
    Assignments through an alias (``config.hidden_size = ...``) are validated as the aliased field (``d_model``).
    """
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name: str, value: Any) -> None:
        name = type(self).attribute_map.get(name, name)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            raise _field_error(self, name, value, error.__cause__) from error.__cause__

    def validate(self) -> None:
        """Run the class validators (``validate_*``), as ``@strict``'s ``validate``, raising ``ValueError``s."""
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise TxlConfigClassError(str(error.__cause__)) from error.__cause__

    validate.__is_defined_by_strict_decorator__ = True  # lets a `@strict` subclass replace it, as strict's own
    cls.__setattr__, cls.validate = __setattr__, validate
    return cls


@_raise_value_errors
@strict
class TxlConfig(PreTrainedConfig):
    r"""Configuration of a Transformer-XL language model.

    Field names are the paper's / original code's; transformers' standard names are aliases
    (``hidden_size`` -> ``d_model``, ``num_hidden_layers`` -> ``n_layer``,
    ``num_attention_heads`` -> ``n_head``, ``n_token`` -> ``vocab_size``). Defaults are the paper's enwik8 base model
    (12 layers, d_model 512, 8 heads of 64, d_inner 2048, memory 512; 204 byte symbols as in the original
    enwik8 preprocessing).

    Every field is checked when it is set (at construction and on assignment); the rules that involve several
    fields are checked at construction, by :meth:`validate_txl` (which the model calls) and by ``save_pretrained``.
    An invalid value raises a ``ValueError`` (:class:`TxlConfigFieldError` / :class:`TxlConfigClassError`) that
    names the field.

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
        use_cache: return the memory (a transformers ``Cache``) from the forward pass, to be passed back for the next
            segment or generation step; only when ``mem_len > 0``.
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
    keys_to_ignore_at_inference = ["cache", "mems"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "n_token": "vocab_size",
    }

    vocab_size: int = _positive_int(204)  # tokens in the vocabulary (enwik8: 204 byte symbols)
    d_model: int = _positive_int(512)  # width of the residual stream and of the embeddings
    n_layer: int = _positive_int(12)  # number of Transformer-XL layers
    n_head: int = _positive_int(8)  # attention heads per layer (H)
    d_head: int = _positive_int(64)  # width of one head (D); n_head * d_head need not equal d_model
    d_inner: int = _positive_int(2048)  # hidden width of the position-wise feed-forward network
    dropout: float | int = _ranged("a dropout probability in [0, 1)", 0.1, min=0, max=1, exclude_max=True)  # residual
    dropatt: float | int = _ranged("a dropout probability in [0, 1)", 0.0, min=0, max=1, exclude_max=True)  # attention
    mem_len: int = _ranged("an integer >= 0 (0 disables the memory)", 512, min=0)  # past states kept per layer (M)
    clamp_len: int = _ranged("an integer >= -1 (-1 disables clamping)", -1, min=-1)  # longest relative distance
    same_length: bool = False  # every query attends to mem_len keys (the paper's evaluation); needs mem_len > 0
    pre_lnorm: bool = False  # LayerNorm before each sub-layer instead of after the residual sum
    untie_r: bool = True  # one pair of position biases u, v per layer (True) or one shared pair (False)
    tie_word_embeddings: bool = True  # the output projection (softmax) shares the input embedding weights
    use_cache: bool = True  # the forward pass returns the memory as a transformers Cache (when mem_len > 0)
    layer_norm_epsilon: float | int = _ranged("a number > 0", 1e-5, min=0, exclude_min=True)  # LayerNorm epsilon
    init_std: float | int = _ranged("a number > 0", 0.02, min=0, exclude_min=True)  # std of the normal init
    cutoffs: list[int] = field(  # adaptive softmax / input cluster boundaries; [] is one full softmax
        default_factory=list, metadata={_RULE: "a list of strictly increasing integers in (0, vocab_size)"}
    )
    div_val: int = _positive_int(1)  # cluster i embeds in d_embed // div_val**i dimensions
    d_embed: int | None = validated_field(  # width of the (head) embeddings; None means d_model
        _none_or_positive, default=None, metadata={_RULE: "a positive integer or None (None: d_model)"}
    )
    proj_share_all_but_first: bool = False  # tail clusters' softmax projections reuse the input projections
    legacy_zero_mems: bool = False  # first segment attends to mem_len zero vectors, as transformers 4.x did

    def __post_init__(self, **kwargs):
        self.cutoffs = list(self.cutoffs)  # a copy: the caller's list (or a module-level default) is not shared
        super().__post_init__(**kwargs)

    def validate_txl(self) -> None:
        """Raise ``ValueError`` naming the first invalid field.

        Part of the ``@strict`` validation (it runs at construction and in ``save_pretrained``); the model calls it
        at construction too. It re-checks every field, so that it also catches changes that bypass assignment
        checks (``config.cutoffs.append(...)``), then the rules that involve several fields.
        """
        for name, validators in type(self).__validators__.items():
            value = getattr(self, name)
            for validator in validators:
                try:
                    validator(value)
                except (ValueError, TypeError) as error:
                    raise _field_error(self, name, value, error) from error
        if self.same_length and self.mem_len == 0:
            raise TxlConfigClassError(
                "TxlConfig: `same_length=True` makes every query attend to exactly `mem_len` keys and needs "
                "`mem_len > 0`; set `mem_len` or turn `same_length` off."
            )
        self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        cutoffs = self.cutoffs
        if any(not a < b for a, b in zip([0, *cutoffs], [*cutoffs, self.vocab_size])):
            raise TxlConfigClassError(
                f"TxlConfig: `cutoffs` must be strictly increasing integers in (0, vocab_size={self.vocab_size}), "
                f"got {cutoffs!r}."
            )
        if self.embed_dim() // self.div_val ** len(cutoffs) < 1:
            raise TxlConfigClassError(
                f"TxlConfig: with `div_val={self.div_val}` the last of the {len(cutoffs) + 1} clusters would embed "
                f"in d_embed // div_val**{len(cutoffs)} = 0 dimensions; raise `d_embed` ({self.embed_dim()}) or lower "
                "`div_val`."
            )

    def embed_dim(self) -> int:
        """Width of the (head cluster's) embeddings: ``d_embed``, or ``d_model`` when it is None."""
        return self.d_model if self.d_embed is None else self.d_embed

    def uses_adaptive(self) -> bool:
        """Adaptive embedding + adaptive log-softmax (clusters or projections) instead of one matrix each."""
        return bool(self.cutoffs) or self.div_val != 1 or self.embed_dim() != self.d_model


__all__ = ["TxlConfig", "TxlConfigClassError", "TxlConfigFieldError"]
