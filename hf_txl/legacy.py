"""Loading transformers 4.x ``transfo-xl`` checkpoints (``TransfoXLLMHeadModel``, transformers <= 4.35), safely.

Importing :mod:`hf_txl` registers :class:`TxlLegacyConfig` (``model_type="transfo-xl"``) with ``AutoConfig`` and
the classes below with ``AutoModel`` / ``AutoModelForCausalLM``, so a directory saved by transformers 4.x loads
with ``AutoModelForCausalLM.from_pretrained(path)``. ``scripts/convert_legacy.py`` writes it out as a native
``hf_txl`` directory instead (the recommended path: native directories also load with ``trust_remote_code``).

What differs from a native model and why:
    * the config's legacy fields are translated (:class:`TxlLegacyConfig`); fields hf_txl cannot honour
      (``sample_softmax > 0``, ``attn_type != 0``, a tied head projection) raise a ``ValueError`` naming them;
    * ``legacy_zero_mems=True``: the first segment attends to ``mem_len`` zero vectors, as 4.x did (the original
      code starts from an empty memory), so outputs match 4.x from the first token;
    * weights are renamed from the 4.x names (``dec_attn.qkv_net``, ``pos_ff.CoreNet.0``, ``crit.out_layers``...);
      tied copies that 4.x overwrote at load time (``crit.out_layers.i.weight`` under ``tie_word_embeddings``,
      ``crit.out_projs.i`` under ``tie_projs``, per-layer copies of shared ``r_w_bias`` / ``r_r_bias``) and the
      ``pos_emb.inv_freq`` buffer are dropped. Missing or unexpected keys, and shape mismatches between the config
      and the weights, are errors that list the offending keys (never silently re-initialised weights);
    * ``.bin`` files are read with ``torch.load(..., weights_only=True)`` only; ``.safetensors`` is preferred.

The 4.x word tokenizer's ``vocab.pkl`` is a pickle; :func:`convert_vocab_pkl` reads it with
:class:`RestrictedUnpickler` (plain containers, strings and numbers only) and writes a ``tokenizers`` word-level
``tokenizer.json``. The modeling file never imports this module.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from .configuration_txl import TxlConfig
from .modeling_txl import TxlForCausalLM, TxlModel

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

#: transformers 4.35 ``TransfoXLConfig`` defaults: a 4.x config.json omits fields equal to the library defaults
#: only for ``PretrainedConfig`` fields, but older files may lack newer fields, which then take these values.
LEGACY_DEFAULTS = dict(
    vocab_size=267735, cutoffs=[20000, 40000, 200000], d_model=1024, d_embed=1024, n_head=16, d_head=64,
    d_inner=4096, div_val=4, pre_lnorm=False, n_layer=18, mem_len=1600, clamp_len=1000, same_length=True,
    proj_share_all_but_first=True, attn_type=0, sample_softmax=-1, adaptive=True, dropout=0.1, dropatt=0.0,
    untie_r=True, init_std=0.02, layer_norm_epsilon=1e-5, eos_token_id=0,
)  # fmt: skip

# Legacy fields that only steered initialisation or the (removed) TensorFlow / data code: accepted and dropped.
_IGNORED_LEGACY_FIELDS = ("init", "init_range", "proj_init_std", "adaptive", "tgt_len", "ext_len", "eval_tgt_len",
                          "trainer_compatible", "tie_projs", "n_token", "attn_type", "sample_softmax")  # fmt: skip


class TxlLegacyConfig(TxlConfig):
    """A transformers 4.x ``transfo-xl`` config, read into hf_txl's :class:`TxlConfig` fields.

    Translation: ``n_token`` -> ``vocab_size``; ``tie_projs`` (what 4.x stored) -> ``proj_share_all_but_first``
    (``[False, True, ...]`` -> True, all False -> False; a tied head projection is refused); ``attn_type`` must be 0
    and ``sample_softmax`` <= 0 (4.x could not run anything else either); ``adaptive``, ``init*``, ``tgt_len`` and
    ``ext_len`` did not affect the 4.x PyTorch forward and are dropped. ``legacy_zero_mems`` defaults to True.
    """

    model_type = "transfo-xl"

    def __init__(self, **kwargs):
        for name, value in LEGACY_DEFAULTS.items():
            kwargs.setdefault(name, value)
        if "n_token" in kwargs:
            kwargs["vocab_size"] = kwargs["n_token"]
        if kwargs["attn_type"] != 0:
            raise ValueError(
                f"transfo-xl config: `attn_type={kwargs['attn_type']}` is not supported; hf_txl implements the "
                "paper's relative attention (attn_type=0) only, as did transformers 4.x."
            )
        if kwargs["sample_softmax"] is not None and kwargs["sample_softmax"] > 0:
            raise ValueError(
                f"transfo-xl config: `sample_softmax={kwargs['sample_softmax']}` (sampled softmax) is not supported; "
                "hf_txl computes the full (adaptive) softmax. Set `sample_softmax=-1`."
            )
        tie_projs = kwargs.get("tie_projs")
        if tie_projs is not None:  # 4.x stored the list, which overrode `proj_share_all_but_first`
            tie_projs = [bool(t) for t in tie_projs]
            if tie_projs[:1] == [True]:
                raise ValueError(
                    f"transfo-xl config: `tie_projs={tie_projs}` ties the head cluster's softmax projection to the "
                    "input projection; hf_txl supports tying the tail projections only (`tie_projs[0]` False)."
                )
            if len(set(tie_projs[1:])) > 1:
                raise ValueError(
                    f"transfo-xl config: `tie_projs={tie_projs}` ties some tail projections but not others; hf_txl "
                    "supports all tails tied (proj_share_all_but_first) or none."
                )
            kwargs["proj_share_all_but_first"] = bool(tie_projs[1:]) and tie_projs[1]
        kwargs.setdefault("legacy_zero_mems", True)
        for name in _IGNORED_LEGACY_FIELDS:
            kwargs.pop(name, None)
        super().__init__(**kwargs)

    def to_native(self) -> TxlConfig:
        """The equivalent native :class:`TxlConfig` (``model_type="hf_txl"``)."""
        fields = self.to_dict()
        for name in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
            fields.pop(name, None)
        return TxlConfig(**fields)


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------

# (4.x name pattern, hf_txl name) for names that only change spelling; `\g<n>` keeps the indices.
_RENAMES = [
    (r"transformer\.layers\.(\d+)\.dec_attn\.qkv_net\.weight", r"transformer.layers.\1.attn.qkv_proj.weight"),
    (r"transformer\.layers\.(\d+)\.dec_attn\.r_net\.weight", r"transformer.layers.\1.attn.r_proj.weight"),
    (r"transformer\.layers\.(\d+)\.dec_attn\.o_net\.weight", r"transformer.layers.\1.attn.o_proj.weight"),
    (r"transformer\.layers\.(\d+)\.dec_attn\.layer_norm\.(weight|bias)", r"transformer.layers.\1.attn.layer_norm.\2"),
    (r"transformer\.layers\.(\d+)\.pos_ff\.CoreNet\.0\.(weight|bias)", r"transformer.layers.\1.ff.fc_in.\2"),
    (r"transformer\.layers\.(\d+)\.pos_ff\.CoreNet\.3\.(weight|bias)", r"transformer.layers.\1.ff.fc_out.\2"),
    (r"transformer\.layers\.(\d+)\.pos_ff\.layer_norm\.(weight|bias)", r"transformer.layers.\1.ff.layer_norm.\2"),
    (r"transformer\.(r_w_bias|r_r_bias)", r"transformer.\1"),
    (r"crit\.(cluster_weight|cluster_bias)", r"lm_head.\1"),
]


def convert_legacy_state_dict(state: dict[str, torch.Tensor], config: TxlConfig) -> dict[str, torch.Tensor]:
    """Rename a 4.x ``TransfoXLLMHeadModel`` state dict to :class:`~hf_txl.TxlForCausalLM` names.

    Keys that match no rule are kept as they are, so that the caller reports them as unexpected.
    """
    adaptive = config.uses_adaptive()
    n_clusters = len(config.cutoffs)
    tied_projs = [i > 0 and config.proj_share_all_but_first for i in range(n_clusters + 1)]
    out = {}
    for key, tensor in state.items():
        if key == "transformer.pos_emb.inv_freq":
            continue  # recomputed from d_model
        if match := re.fullmatch(r"transformer\.layers\.(\d+)\.dec_attn\.(r_w_bias|r_r_bias)", key):
            if config.untie_r:
                out[f"transformer.layers.{match[1]}.attn.{match[2]}"] = tensor
            continue  # untie_r=False: a copy of transformer.r_w_bias / r_r_bias in .bin files
        if match := re.fullmatch(r"transformer\.word_emb\.emb_layers\.(\d+)\.weight", key):
            out[f"transformer.word_emb.emb_layers.{match[1]}.weight" if adaptive else "transformer.word_emb.weight"] = (
                tensor
            )
            continue
        if match := re.fullmatch(r"transformer\.word_emb\.emb_projs\.(\d+)", key):
            out[f"transformer.word_emb.emb_projs.{match[1]}.weight"] = tensor
            continue
        if match := re.fullmatch(r"crit\.out_layers\.(\d+)\.(weight|bias)", key):
            if match[2] == "weight" and config.tie_word_embeddings:
                continue  # 4.x replaced it by the embedding in tie_weights()
            out[f"lm_head.out_layers.{match[1]}.{match[2]}" if adaptive else f"lm_head.{match[2]}"] = tensor
            continue
        if match := re.fullmatch(r"crit\.out_projs\.(\d+)", key):
            index = int(match[1])
            if index < len(tied_projs) and tied_projs[index]:
                continue  # 4.x replaced it by the input projection in tie_weights()
            out[f"lm_head.out_projs.{index}.weight"] = tensor
            continue
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            out[key] = tensor
    if not adaptive and config.tie_word_embeddings and "transformer.word_emb.weight" in out:
        out["lm_head.weight"] = out["transformer.word_emb.weight"]  # the same parameter in TxlForCausalLM
    return out


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _resolve(path, filename: str, hub_kwargs: dict) -> str | None:
    """Local path of ``filename`` in a directory or a Hub repository, or None when it does not exist."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    return cached_file(
        path, filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        **{k: v for k, v in hub_kwargs.items() if v is not None},
    )  # fmt: skip


def read_weights(filename: str) -> dict[str, torch.Tensor]:
    """Read one weight file: safetensors, or a ``.bin`` through ``torch.load(weights_only=True)`` (no code runs)."""
    if filename.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(filename)
    return torch.load(filename, map_location="cpu", weights_only=True)


def load_legacy_weights(path, hub_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """The raw 4.x state dict of a directory / repo: ``model.safetensors`` or ``pytorch_model.bin`` (or shards)."""
    hub_kwargs = hub_kwargs or {}
    for name in _WEIGHT_FILES:
        if (index := _resolve(path, name + ".index.json", hub_kwargs)) is not None:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(read_weights(_resolve(path, shard, hub_kwargs)))
            return state
        if (single := _resolve(path, name, hub_kwargs)) is not None:
            return read_weights(single)
    raise FileNotFoundError(f"No {' or '.join(_WEIGHT_FILES)} (or sharded index) found in {path}.")


def load_converted_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, but every missing / unexpected key and shape mismatch is an error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch between config and weights for " + "; ".join(mismatched))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise ValueError("Cannot load the transfo-xl checkpoint: " + ". ".join(problems) + ".")
    model.load_state_dict(state, strict=True)


class _LegacyLoadingMixin:
    """``from_pretrained`` for 4.x directories: read, rename, check strictly, load. Returns the model in eval mode."""

    _auto_class = None  # a legacy model is saved through scripts/convert_legacy.py, not as remote code

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments.")
        hub_names = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
        hub_kwargs = {name: kwargs.pop(name) for name in hub_names if name in kwargs}
        for name in ("trust_remote_code", "_from_auto", "_commit_hash", "adapter_kwargs", "code_revision"):
            kwargs.pop(name, None)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        attn_implementation = kwargs.pop("attn_implementation", None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if config is None:
            config = TxlLegacyConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        for name, value in kwargs.items():  # as in transformers: leftover kwargs update the config
            if not hasattr(config, name):
                raise TypeError(f"{cls.__name__}.from_pretrained got an unexpected keyword argument {name!r}.")
            setattr(config, name, value)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        config.validate_txl()
        model = cls(config)
        state = convert_legacy_state_dict(load_legacy_weights(pretrained_model_name_or_path, hub_kwargs), config)
        if not isinstance(model, TxlForCausalLM):  # base model: the decoder stack only
            state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head.")}
        load_converted_state(model, state)
        if dtype is not None and dtype != "auto":
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model


class TxlLegacyModel(_LegacyLoadingMixin, TxlModel):
    """:class:`~hf_txl.TxlModel` loaded from a 4.x ``transfo-xl`` checkpoint (``AutoModel``)."""

    config_class = TxlLegacyConfig


class TxlLegacyForCausalLM(_LegacyLoadingMixin, TxlForCausalLM):
    """:class:`~hf_txl.TxlForCausalLM` loaded from a 4.x ``TransfoXLLMHeadModel`` checkpoint
    (``AutoModelForCausalLM``). ``logits`` are the 4.x ``prediction_scores`` (log-probabilities)."""

    config_class = TxlLegacyConfig


# ----------------------------------------------------------------------------------------------------
# vocab.pkl -> tokenizer.json, without running pickled code
# ----------------------------------------------------------------------------------------------------


class _Inert:
    """Stands in for tokenizer helper objects of a 4.x ``vocab.pkl`` (Moses tokenizers, compiled regexes): it
    accepts any arguments and state and does nothing with them. Only the globals listed in
    ``RestrictedUnpickler.INERT`` are mapped to it; their real code is never imported or called."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert_factory(*args, **kwargs):
    return _Inert()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for vocabularies: plain containers (dict, list, tuple, set, ``OrderedDict``, ``Counter``),
    strings, bytes, numbers, booleans and None. Every other global is refused with ``pickle.UnpicklingError``
    naming it, so a pickle that would run code (``os.system``, ``eval``, ``subprocess``...) is rejected before
    anything runs. The persistent-id hook is refused as well.

    4.x ``save_vocabulary`` pickled the whole tokenizer ``__dict__``, which also holds Moses tokenizer objects,
    compiled regexes, a ``Trie`` and ``AddedToken`` s; those few names (``INERT``) are replaced by an inert
    placeholder without importing them. Bytes pickled by protocol 2 (``_codecs.encode(text, "latin1")``) are
    rebuilt by a local function that only encodes.
    """

    ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "Counter"): Counter,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("builtins", "bytearray"): bytearray,
    }
    INERT = {
        ("re", "_compile"),
        ("sacremoses.normalize", "MosesPunctNormalizer"),
        ("sacremoses.tokenize", "MosesTokenizer"),
        ("sacremoses.tokenize", "MosesDetokenizer"),
        ("transformers.tokenization_utils", "Trie"),
        ("tokenizers", "AddedToken"),
    }

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins"}.get(module, module)  # Python 2 / protocol <= 2 spelling
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if (module, name) in self.INERT:
            return _inert_factory if name == "_compile" else _Inert
        raise pickle.UnpicklingError(
            f"vocab.pkl refers to {module}.{name}, which is not a plain container, string or number; refusing to "
            "load it (a pickle can run arbitrary code when loaded)."
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("vocab.pkl uses persistent ids; refusing to load it.")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"vocab.pkl encodes bytes as {encoding!r}; only latin1 is accepted.")
    return text.encode("latin1")


def safe_load_vocab_pkl(data: bytes | str | os.PathLike) -> dict:
    """The dict stored in a legacy ``vocab.pkl`` (file path or bytes), read with :class:`RestrictedUnpickler`."""
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    vocab = RestrictedUnpickler(io.BytesIO(raw)).load()
    if not isinstance(vocab, dict):
        raise ValueError(f"vocab.pkl holds a {type(vocab).__name__}, expected the tokenizer's dict.")
    return vocab


def vocab_pkl_to_tokenizer(data: bytes | str | os.PathLike):
    """A ``tokenizers.Tokenizer``: word-level over ``idx2sym`` (ids preserved), splitting on whitespace as the 4.x
    tokenizer did for pre-tokenised text (``delimiter`` None or a space), lower-casing when ``lower_case`` was set.

    The 4.x tokenizer also ran Moses punctuation normalisation and tokenisation before the lookup; that step is not
    reproduced (it needs sacremoses): feed text tokenised the way the model's corpus was (WikiText-103 already is).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = safe_load_vocab_pkl(data)
    idx2sym = vocab.get("idx2sym")
    if idx2sym is None and "sym2idx" in vocab:
        idx2sym = [sym for sym, _ in sorted(vocab["sym2idx"].items(), key=lambda item: item[1])]
    if not idx2sym or not all(isinstance(s, str) for s in idx2sym):
        raise ValueError("vocab.pkl has no `idx2sym` / `sym2idx` list of string symbols.")
    unk = next((u for u in ("<unk>", "<UNK>") if u in idx2sym), None)
    tokenizer = Tokenizer(WordLevel({sym: i for i, sym in enumerate(idx2sym)}, unk_token=unk))
    delimiter = vocab.get("delimiter")
    if delimiter not in (None, "", " "):
        raise ValueError(f"vocab.pkl uses delimiter={delimiter!r}; only whitespace splitting is supported.")
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if vocab.get("lower_case"):
        tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer, {"unk_token": unk, "eos_token": "<eos>" if "<eos>" in idx2sym else None}


def convert_vocab_pkl(vocab_pkl, out_dir) -> Path:
    """Write ``tokenizer.json`` (+ ``tokenizer_config.json``) loadable by ``PreTrainedTokenizerFast`` /
    ``AutoTokenizer`` into ``out_dir``; returns the ``tokenizer.json`` path."""
    from transformers import PreTrainedTokenizerFast

    tokenizer, special = vocab_pkl_to_tokenizer(vocab_pkl)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in special.items() if v})
    fast.save_pretrained(out_dir)
    return Path(out_dir) / "tokenizer.json"


__all__ = [
    "RestrictedUnpickler",
    "TxlLegacyConfig",
    "TxlLegacyForCausalLM",
    "TxlLegacyModel",
    "convert_legacy_state_dict",
    "convert_vocab_pkl",
    "load_legacy_weights",
    "safe_load_vocab_pkl",
    "vocab_pkl_to_tokenizer",
]
