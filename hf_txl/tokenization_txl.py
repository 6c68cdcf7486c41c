"""Character- and byte-level tokenizers for Transformer-XL language models.

``TxlCharTokenizer`` is a transformers fast tokenizer (a ``TokenizersBackend`` subclass) whose backend is
a ``tokenizers.Tokenizer`` with one token per character (Unicode code point) or, for corpora scored per
byte (the enwik8 convention), one token per UTF-8 byte. Both satisfy ``decode(encode(text)) == text`` for
every text made of known symbols.

The backend is a BPE model with an empty merge list and no pre-tokenizer: it splits a text into code
points and looks each one up, which is exact (whitespace, newlines and emoji included) and faster than a
per-character regex split. Text is never matched against the special-token strings
(``split_special_tokens=True``), so a literal ``"<eos>"`` in a corpus stays five characters.

Saved directories hold ``tokenizer.json`` + ``tokenizer_config.json`` only (no pickle); the config names the
built-in ``TokenizersBackend`` class, so ``AutoTokenizer.from_pretrained(dir)`` works without hf_txl installed
and without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import TokenizersBackend

__all__ = ["TxlCharTokenizer", "UnknownCharacterWarning"]

# Class name written to tokenizer_config.json: built into transformers, so loading needs no remote code.
_SAVED_TOKENIZER_CLASS = "TokenizersBackend"


class UnknownCharacterWarning(UserWarning):
    """Emitted when encoding maps characters outside the vocabulary to the unknown token."""


class TxlCharTokenizer(TokenizersBackend):
    """Character-level (or byte-level) tokenizer; build it with :meth:`from_corpus` or :meth:`byte_level`.

    Special tokens come first in the vocabulary for the character level (``<unk>``, ``<pad>``, then ``<eos>``
    when ``add_eos=True``), followed by the corpus characters sorted by code point. The byte level keeps byte
    ``b`` at id ``b`` and puts the special tokens after the 256 bytes. Padding is on the left by default.
    """

    #: Tells the data pipeline that a text may be cut anywhere (between code points) without changing its ids.
    is_char_level = True

    @classmethod
    def from_corpus(
        cls,
        texts: Iterable[str],
        *,
        add_eos: bool = False,
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        **kwargs,
    ) -> TxlCharTokenizer:
        """Learn a one-token-per-character vocabulary from ``texts`` (an iterable of strings).

        The order is deterministic: the special tokens, then every distinct character sorted by code point.
        ``add_eos`` adds an end-of-text token (for corpora made of documents); without it ``eos_token_id`` is
        None. Extra keyword arguments go to the transformers tokenizer constructor.
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
        return cls._from_backend(backend, unk_token, pad_token, eos_token if add_eos else None, **kwargs)

    @classmethod
    def byte_level(
        cls,
        *,
        add_eos: bool = False,
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        **kwargs,
    ) -> TxlCharTokenizer:
        """Build the 256-symbol byte vocabulary (byte ``b`` has id ``b``) plus the special tokens after it.

        Every text encodes to its UTF-8 bytes, so nothing is ever unknown; the unknown token exists for API
        uniformity. Use it for corpora scored in bits per byte (enwik8).
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

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """Save ``tokenizer.json`` + ``tokenizer_config.json``, naming a class built into transformers."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for path in files:
            if os.path.basename(path) == "tokenizer_config.json":
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                config["tokenizer_class"] = _SAVED_TOKENIZER_CLASS
                with open(path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


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
