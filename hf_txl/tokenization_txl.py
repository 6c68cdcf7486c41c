"""Character-, byte- and word-level tokenizers for Transformer-XL language models.

``TxlCharTokenizer`` is a transformers fast tokenizer (a ``TokenizersBackend`` subclass) whose backend is
a ``tokenizers.Tokenizer`` with one token per character (Unicode code point) or, for corpora scored per
byte (the enwik8 convention), one token per UTF-8 byte. Both satisfy ``decode(encode(text)) == text`` for
every text made of known symbols.

The backend is a BPE model with an empty merge list and no pre-tokenizer: it splits a text into code
points and looks each one up, which is exact (whitespace, newlines and emoji included) and faster than a
per-character regex split. Text is never matched against the special-token strings
(``split_special_tokens=True``), so a literal ``"<eos>"`` in a corpus stays five characters.

``TxlWordTokenizer`` is the word-level counterpart for corpora that are already tokenized (WikiText-103): a
``WordLevel`` model over whitespace-separated words, with every newline encoded as the ``<eos>`` word, as in the
paper's preprocessing (each line's words, then ``<eos>``). :func:`build_tokenizer` builds any of the three kinds
and :func:`token_unit` tells which kind a tokenizer is, also for one loaded by ``AutoTokenizer``.

Every tokenizer built here has an end-of-text token (``eos_token_id`` is set), which clients such as
lm-evaluation-harness need (it prefixes every scored text with it when there is no bos): ``<eos>`` for the
character and byte levels, where it separates the documents of a corpus (``tokenize_to_array(append_eos=True)``)
and ends generation; the line-end word ``<eos>`` for the word level, where it is every newline, so word models do
not stop generating at it (:func:`generation_eos_token_id`).

Saved directories hold ``tokenizer.json`` + ``tokenizer_config.json`` only (no pickle); the config names the
built-in ``TokenizersBackend`` class, so ``AutoTokenizer.from_pretrained(dir)`` works without hf_txl installed
and without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import TokenizersBackend

__all__ = [
    "TOKENIZER_KINDS",
    "TxlCharTokenizer",
    "TxlWordTokenizer",
    "UnknownCharacterWarning",
    "build_tokenizer",
    "fast_word_encoder",
    "generation_eos_token_id",
    "token_unit",
]

#: The kinds :func:`build_tokenizer` builds, which are also the units :func:`token_unit` reports.
TOKENIZER_KINDS = ("char", "byte", "word")

# Class name written to tokenizer_config.json: built into transformers, so loading needs no remote code.
_SAVED_TOKENIZER_CLASS = "TokenizersBackend"


class UnknownCharacterWarning(UserWarning):
    """Emitted when encoding maps characters outside the vocabulary to the unknown token."""


class _TxlTokenizersBackend(TokenizersBackend):
    """Saved as a tokenizer built into transformers, so that ``AutoTokenizer`` loads it without hf_txl."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """Save ``tokenizer.json`` + ``tokenizer_config.json``, naming a class built into transformers."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        _name_builtin_class(files)
        return files


class TxlCharTokenizer(_TxlTokenizersBackend):
    """Character-level (or byte-level) tokenizer; build it with :meth:`from_corpus` or :meth:`byte_level`.

    Special tokens come first in the vocabulary for the character level (``<unk>`` 0, ``<pad>`` 1, ``<eos>`` 2),
    followed by the corpus characters sorted by code point. The byte level keeps byte ``b`` at id ``b`` and puts the
    special tokens after the 256 bytes (``<unk>`` 256, ``<pad>`` 257, ``<eos>`` 258). ``<eos>`` ends a text: it
    separates the documents of a multi-document corpus and is where generation stops (a model trained on one
    document learns not to predict it); ``add_eos=False`` leaves it out (the vocabulary of hf_txl before it had
    one, where ``eos_token_id`` is None). Padding is on the left by default.
    """

    #: Tells the data pipeline that a text may be cut anywhere (between code points) without changing its ids.
    is_char_level = True

    @classmethod
    def from_corpus(
        cls,
        texts: Iterable[str],
        *,
        add_eos: bool = True,
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        **kwargs,
    ) -> TxlCharTokenizer:
        """Learn a one-token-per-character vocabulary from ``texts`` (an iterable of strings).

        The order is deterministic: the special tokens, then every distinct character sorted by code point.
        ``add_eos`` (the default) includes the end-of-text token ``eos_token``; with ``add_eos=False`` the
        vocabulary has no eos and ``eos_token_id`` is None. Extra keyword arguments go to the transformers tokenizer
        constructor.
        """
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"from_corpus expects an iterable of str, got an item of type {type(text)}")
            chars.update(text)
        if not chars:
            raise ValueError("from_corpus got an empty corpus: pass at least one non-empty text")
        specials = _special_list(unk_token, pad_token, eos_token if add_eos else None)
        clash = sorted(set(specials) & chars)
        if clash:
            raise ValueError(f"special tokens {clash} are also corpus characters; choose other strings")
        vocab = {tok: i for i, tok in enumerate(specials)}
        for ch in sorted(chars):
            vocab[ch] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token, fuse_unk=False))
        backend.decoder = decoders.Fuse()
        kwargs.setdefault("token_unit", "char")
        return cls._from_backend(backend, unk_token, pad_token, eos_token if add_eos else None, **kwargs)

    @classmethod
    def byte_level(
        cls,
        *,
        add_eos: bool = True,
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        **kwargs,
    ) -> TxlCharTokenizer:
        """Build the 256-symbol byte vocabulary (byte ``b`` has id ``b``) plus the special tokens after it.

        Every text encodes to its UTF-8 bytes, so nothing is ever unknown; the unknown token exists for API
        uniformity. Use it for corpora scored in bits per byte (enwik8). ``add_eos=False`` leaves the end-of-text
        token out (258 symbols instead of 259).
        """
        byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte map
        byte_to_char = _gpt2_byte_to_char()
        if set(byte_to_char.values()) != set(byte_chars):
            raise RuntimeError("unexpected tokenizers ByteLevel alphabet")  # pragma: no cover
        vocab = {byte_to_char[b]: b for b in range(256)}
        for tok in _special_list(unk_token, pad_token, eos_token if add_eos else None):
            vocab[tok] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        kwargs.setdefault("token_unit", "byte")
        return cls._from_backend(backend, unk_token, pad_token, eos_token if add_eos else None, **kwargs)

    @classmethod
    def _from_backend(
        cls, backend: Tokenizer, unk_token: str, pad_token: str, eos_token: str | None, **kwargs
    ) -> TxlCharTokenizer:
        options = {
            "padding_side": "left",
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            **kwargs,
        }
        return cls(
            tokenizer_object=backend,
            unk_token=unk_token,
            pad_token=pad_token,
            eos_token=eos_token,
            bos_token=None,
            **options,
        )

    def _encode_plus(self, *args, **kwargs):
        """Encode as transformers does, then warn (``UnknownCharacterWarning``) if any symbol was unknown."""
        output = super()._encode_plus(*args, **kwargs)
        unk_id = self.unk_token_id
        if unk_id is not None and "input_ids" in output:
            n_unknown = _count(output["input_ids"], unk_id)
            if n_unknown:
                text = args[0] if args else kwargs.get("text")
                examples = sorted(_chars_of(text) - set(self.get_vocab()))[:10]
                warnings.warn(
                    f"{n_unknown} unknown character(s) were encoded as {self.unk_token!r} (e.g. {examples}); "
                    "build the tokenizer from a corpus that contains them, or use "
                    "TxlCharTokenizer.byte_level()",
                    UnknownCharacterWarning,
                    stacklevel=3,
                )
        return output


class TxlWordTokenizer(_TxlTokenizersBackend):
    """Word-level tokenizer for pre-tokenized corpora (WikiText-103); build it with :meth:`from_corpus`.

    A text is split on whitespace into words (``WhitespaceSplit``), and every newline becomes the line-end word
    ``<eos>``, so ``"a b\\nc\\n"`` encodes as ``a b <eos> c <eos>``: the Transformer-XL preprocessing of
    WikiText-103 (each line's words, then ``<eos>``). Words outside the vocabulary become ``<unk>`` (WikiText-103
    already contains ``<unk>`` words; they get the same id). The vocabulary is ``<unk>`` (id 0), ``<pad>`` (1),
    ``<eos>`` (2), then the corpus words from the most to the least frequent (ties in code point order), the
    order an adaptive softmax expects (its head cluster holds the most frequent ids).

    ``<eos>`` is also transformers' ``eos_token``, the end-of-text token that clients such as lm-evaluation-harness
    put before a scored text (a text then starts as a WikiText-103 line does, after a line end). As it is every
    line end, it is not where a word model's generation stops: :func:`generation_eos_token_id` is None for this
    tokenizer, so the training script leaves the model's ``eos_token_id`` None. Being a special token, it is
    dropped by ``decode(..., skip_special_tokens=True)`` (the lines are then joined by spaces); decode with
    ``skip_special_tokens=False`` to keep the line breaks. ``decode`` joins the words with single spaces and turns
    each ``<eos>`` into a newline, so ``decode(encode(text))`` is ``text`` with its whitespace normalised (runs of
    spaces and tabs -> one space, none around newlines).
    """

    #: Word-level ids depend on where a text is cut, so the data pipeline cuts long texts at line ends only.
    is_char_level = False

    @classmethod
    def from_corpus(
        cls,
        texts: Iterable[str],
        *,
        min_frequency: int = 1,
        max_vocab_size: int | None = None,
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        line_end_token: str = "<eos>",
        **kwargs,
    ) -> TxlWordTokenizer:
        """Learn a word vocabulary from ``texts`` (an iterable of strings, read once).

        Words seen fewer than ``min_frequency`` times, and those beyond the ``max_vocab_size`` most frequent
        (``max_vocab_size`` counts the three special tokens: ``len(tokenizer) <= max_vocab_size``), are left out
        and encode as ``<unk>``. Extra keyword arguments go to the transformers tokenizer constructor.
        """
        specials = _special_list(unk_token, pad_token, line_end_token)
        _check_word_limits(min_frequency, max_vocab_size, len(specials))
        counts = count_words(texts)
        if not counts:
            raise ValueError("from_corpus got an empty corpus (no words): pass at least one text with a word in it")
        words = select_words(counts, specials, min_frequency=min_frequency, max_vocab_size=max_vocab_size)
        if not words:
            raise ValueError(
                f"min_frequency={min_frequency} leaves no word of the corpus in the vocabulary (the most frequent "
                f"occurs {max(counts.values())} times); lower min_frequency"
            )
        vocab = {tok: i for i, tok in enumerate([*specials, *words])}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
        backend.normalizer = normalizers.Replace("\n", f" {line_end_token} ")
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = _word_decoder(line_end_token)
        options = {
            "padding_side": "left",
            "split_special_tokens": True,  # "x<unk>y" is one (unknown) word, as a whitespace split gives
            "clean_up_tokenization_spaces": False,
            "token_unit": "word",
            "line_end_word": line_end_token,
            **kwargs,
        }
        return cls(
            tokenizer_object=backend,
            unk_token=unk_token,
            pad_token=pad_token,
            eos_token=line_end_token,
            bos_token=None,
            **options,
        )

    @property
    def line_end_token_id(self) -> int:
        """The id of the line-end word ``<eos>`` (2 unless the vocabulary was built with other special tokens)."""
        return self.convert_tokens_to_ids(self.init_kwargs.get("line_end_word", "<eos>"))


def build_tokenizer(
    kind: str, texts: Iterable[str], *, min_frequency: int = 1, max_vocab_size: int | None = None
) -> TxlCharTokenizer | TxlWordTokenizer:
    """The training script's tokenizer: ``kind`` is "char", "byte" or "word" (see :data:`TOKENIZER_KINDS`).

    "char" learns one token per character of ``texts``; "byte" is the fixed 256-byte vocabulary (``texts`` is not
    read); "word" learns a word vocabulary (:meth:`TxlWordTokenizer.from_corpus`), the only kind that takes
    ``min_frequency`` and ``max_vocab_size``. Every kind has an end-of-text token (``eos_token_id`` is set; for
    words it is the line-end word). Raises ``ValueError`` naming the problem and the fix.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")
    if kind == "word":
        return TxlWordTokenizer.from_corpus(texts, min_frequency=min_frequency, max_vocab_size=max_vocab_size)
    if min_frequency != 1 or max_vocab_size is not None:
        raise ValueError(
            f"min_frequency and max_vocab_size apply to word vocabularies only (kind={kind!r} keeps every "
            "symbol); drop them or use kind='word'"
        )
    if kind == "byte":
        return TxlCharTokenizer.byte_level()
    return TxlCharTokenizer.from_corpus(texts)


def generation_eos_token_id(tokenizer: Any) -> int | None:
    """The id at which a model's generation should stop (its config's ``eos_token_id``): the tokenizer's
    end-of-text id, except for word level, whose ``<eos>`` ends every line (generation goes on across lines).
    None when there is no such token (a character tokenizer built with ``add_eos=False``)."""
    return None if token_unit(tokenizer) == "word" else tokenizer.eos_token_id


def token_unit(tokenizer: Any) -> str:
    """What one token of ``tokenizer`` is: "char", "byte", "word", or "token" (any other, e.g. a subword BPE).

    Works on the hf_txl classes and on their saved directories loaded by ``AutoTokenizer`` (the unit is saved
    as ``token_unit`` in tokenizer_config.json); older saves are recognised from the backend model.
    """
    unit = getattr(tokenizer, "init_kwargs", {}).get("token_unit")
    if unit in TOKENIZER_KINDS:
        return unit
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "token"
    if isinstance(backend.model, models.WordLevel):
        return "word"
    if isinstance(backend.model, models.BPE) and not json.loads(backend.to_str())["model"].get("merges"):
        return "byte" if isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) else "char"
    return "token"


def fast_word_encoder(tokenizer: Any) -> Callable[[str], list[int]] | None:
    """A pure-Python encoder giving exactly ``tokenizer``'s ids, for word tokenizers built by this module.

    For a large corpus a dict lookup over ``str.split`` is about ten times faster than the ``tokenizers``
    pipeline, whose per-token ``Encoding`` bookkeeping (strings, offsets) dominates for single words. Returns
    None unless the backend is this module's word pipeline (newline -> line-end word, ``WhitespaceSplit``,
    ``WordLevel``) and no added token is matched in raw text (special tokens split, no non-special ones), the
    conditions under which the two agree (tests/test_tokenizer.py checks them on adversarial texts).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.WordLevel):
        return None
    spec = json.loads(backend.to_str())
    normalizer, line_end = spec.get("normalizer") or {}, None
    if normalizer.get("type") == "Replace" and normalizer.get("pattern") == {"String": "\n"}:
        content = normalizer.get("content", "")
        line_end = content[1:-1] if content.startswith(" ") and content.endswith(" ") else None
    added = spec.get("added_tokens") or []
    raw_matching = not getattr(tokenizer, "split_special_tokens", False) or any(not t["special"] for t in added)
    if line_end is None or spec.get("pre_tokenizer") != {"type": "WhitespaceSplit"} or raw_matching:
        return None
    vocab = spec["model"]["vocab"]
    unk_id = vocab[spec["model"]["unk_token"]]
    line_end_word = f" {line_end} "

    def encode(text: str) -> list[int]:
        return list(map(vocab.get, _split_words(text.replace("\n", line_end_word)), repeat(unk_id)))

    return encode


# --- word counting ------------------------------------------------------------------------------------------

_COUNT_CHARS = 1 << 22  # texts are counted in batches of about this many characters (one str.split each)
# str.split() also splits at \x1c-\x1f, which tokenizers' WhitespaceSplit (Rust char::is_whitespace) does not.
_PYTHON_ONLY_SPACES = re.compile("[\x1c-\x1f]")
_RUST_WORD = re.compile("[^\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def count_words(texts: Iterable[str]) -> Counter:
    """Occurrences of each whitespace-separated word in ``texts``, split exactly as the tokenizer splits."""
    if isinstance(texts, str):
        texts = [texts]
    counts: Counter = Counter()
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"from_corpus expects an iterable of str, got an item of type {type(text)}")
        batch.append(text)
        size += len(text)
        if size >= _COUNT_CHARS:
            counts.update(_split_words("\n".join(batch)))
            batch, size = [], 0
    if batch:
        counts.update(_split_words("\n".join(batch)))
    return counts


def select_words(
    counts: Counter, specials: Iterable[str], *, min_frequency: int = 1, max_vocab_size: int | None = None
) -> list[str]:
    """The vocabulary's words: count >= ``min_frequency``, most frequent first (ties by code point), capped."""
    specials = set(specials)
    kept = [(word, n) for word, n in counts.items() if n >= min_frequency and word not in specials]
    kept.sort(key=lambda item: (-item[1], item[0]))
    if max_vocab_size is not None:
        kept = kept[: max_vocab_size - len(specials)]
    return [word for word, _ in kept]


def _split_words(text: str) -> list[str]:
    return _RUST_WORD.findall(text) if _PYTHON_ONLY_SPACES.search(text) else text.split()


def _check_word_limits(min_frequency: int, max_vocab_size: int | None, n_special: int) -> None:
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(
            f"min_frequency must be an integer >= 1, got {min_frequency!r}; 1 keeps every word, N drops words "
            "seen fewer than N times"
        )
    if max_vocab_size is None:
        return
    if isinstance(max_vocab_size, bool) or not isinstance(max_vocab_size, int) or max_vocab_size <= n_special:
        raise ValueError(
            f"max_vocab_size must be an integer > {n_special} (it counts the {n_special} special tokens and needs "
            f"room for one word at least), got {max_vocab_size!r}; raise it or pass None for no cap"
        )


def _word_decoder(line_end_token: str) -> decoders.Decoder:
    """Words joined by single spaces, each line-end word a newline with no space around it."""
    escaped = re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", line_end_token)
    return decoders.Sequence(
        [
            decoders.Replace(Regex(f"^{escaped}$"), "\n"),
            decoders.WordPiece(prefix=" ", cleanup=False),  # " " never starts a word: every word gets a space
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),
            decoders.Replace("\n ", "\n"),
        ]
    )


def _name_builtin_class(files: Iterable[str]) -> None:
    """Rewrite the saved tokenizer_config.json to name ``TokenizersBackend`` (no remote code needed to load)."""
    for path in files:
        if os.path.basename(path) == "tokenizer_config.json":
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            config["tokenizer_class"] = _SAVED_TOKENIZER_CLASS
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _special_list(unk_token: str, pad_token: str, eos_token: str | None) -> list[str]:
    specials = [unk_token, pad_token] + ([eos_token] if eos_token is not None else [])
    if len(set(specials)) != len(specials) or not all(specials):
        raise ValueError(f"special tokens must be distinct non-empty strings, got {specials}")
    return specials


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one ``tokenizers``' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _count(ids, value: int) -> int:
    """Occurrences of ``value`` in a list of ids or a list of lists of ids (or a tensor/array)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        return sum(row.count(value) for row in ids)
    return ids.count(value)


def _chars_of(text) -> set[str]:
    """The set of characters in a text, a batch of texts, or pairs/pre-tokenized nestings of them."""
    if isinstance(text, str):
        return set(text)
    chars: set[str] = set()
    for item in text or ():
        chars |= _chars_of(item)
    return chars
