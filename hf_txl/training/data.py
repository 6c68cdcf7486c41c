"""Corpus loading, tokenization to a flat token array, and stream batching for a recurrent-memory LM.

The pipeline, top-down::

    corpus = load_corpus()                                  # DatasetDict "train"/"validation", one text column
    train_ids = tokenize_to_array(corpus["train"], tok)     # flat numpy array, e.g. uint8 for a char vocab
    batcher = StreamBatcher(train_ids, batch_size=22, tgt_len=512)   # or StreamBatcher.from_accelerator(...)
    for batch in batcher:                                   # {"input_ids", "shift_labels"}, [batch, tgt_len]
        if batcher.new_epoch: mems = None                   # the memory must not cross an epoch boundary
        out = model(**batch, mems=mems); mems = out.mems

Transformer-XL carries a memory from one segment to the next, so row r at step t+1 must continue row r at
step t (DESIGN.md, "Training data for a recurrent-memory LM"). The stream is therefore cut into
S = batch_size x num_processes contiguous streams; process p owns streams [p*batch_size, (p+1)*batch_size).
The batcher is already per process: do NOT pass it through ``accelerator.prepare`` (Accelerate would re-deal
whole batches between processes and break the row continuity).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_dataset

from ..tokenization_txl import UnknownCharacterWarning, fast_word_encoder, token_unit

__all__ = [
    "DEFAULT_CORPUS_PATH",
    "StreamBatcher",
    "load_corpus",
    "load_token_array",
    "save_token_array",
    "separates_documents",
    "token_dtype",
    "tokenize_to_array",
]

#: The bundled Tiny Shakespeare corpus (1,115,394 characters, 65 distinct).
DEFAULT_CORPUS_PATH = str(Path(__file__).parent / "corpus" / "tiny_shakespeare.txt")

_PIECE_CHARS = 1 << 14  # char-level texts are cut into pieces this long so the Rust encoder runs in parallel
_GROUP_CHARS = 1 << 20  # ~this many characters are encoded per tokenizer call (bounds the Python-int peak)


# ----------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------


def load_corpus(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Load a corpus as a ``DatasetDict`` with "train" and "validation" splits and the one column ``text_column``.

    Sources, in order: a Hub dataset (``dataset_name`` [+ ``dataset_config_name``], column ``text_column``),
    local text files (``train_file`` [+ ``validation_file``]), or the bundled Tiny Shakespeare by default.
    Local files (column "text") are read whole (``sample_by="document"``): every character is kept, newlines included
    (the ``text`` builder opens files in text mode, so ``\\r\\n`` is read as ``\\n``; a warning says so).
    Validation is the dataset's own split / ``validation_file`` when present, otherwise the last
    ``validation_fraction`` of the training characters (cut at a character position).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be in (0, 1), got {validation_fraction}; e.g. 0.1 holds out the last 10%"
        )
    if dataset_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError("pass either dataset_name or train_file/validation_file, not both")

    if dataset_name is not None:
        raw = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        data_files = {"train": _existing_file(train_file if train_file is not None else DEFAULT_CORPUS_PATH)}
        if validation_file is not None:
            data_files["validation"] = _existing_file(validation_file)
        for path in data_files.values():
            _warn_if_carriage_returns(path)
        with _no_load_count():
            raw = load_dataset("text", data_files=data_files, sample_by="document", cache_dir=cache_dir)

    if "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(raw)}); use a dataset with one")
    splits = {}
    for name in ("train", "validation"):
        if name in raw:
            splits[name] = _text_only(raw[name], text_column)
    if _num_chars(splits["train"]) == 0:
        raise ValueError("the training corpus is empty: pass a file or dataset that contains text")
    if "validation" not in splits:
        splits["train"], splits["validation"] = _split_tail(splits["train"], validation_fraction)
    return DatasetDict(splits)


@contextlib.contextmanager
def _no_load_count():
    """Local files need no network: ``load_dataset`` of a packaged builder ("text") sends a HEAD request to count
    the load (``datasets.load.increase_load_count``) unless the Hub is offline, so switch that counter off while
    it runs (the quickstart leaves HF_HUB_OFFLINE as the user has it)."""
    import datasets.config

    counting = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting


def _existing_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file not found: {path!r}; check the train_file/validation_file path")
    return path


def _warn_if_carriage_returns(path: str, block: int = 1 << 24) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if b"\r" in chunk:
                warnings.warn(
                    f"{path} contains '\\r' characters; the datasets text loader reads it with universal "
                    "newlines ('\\r\\n' and '\\r' become '\\n'), so the stream will not be byte-identical "
                    "to the file",
                    stacklevel=3,
                )
                return


def _text_only(split: Dataset, text_column: str) -> Dataset:
    """Keep only ``text_column`` (other columns are dropped)."""
    if text_column not in split.column_names:
        raise ValueError(
            f"text column {text_column!r} not found; available columns: {split.column_names}. "
            "Pass text_column=<one of them>"
        )
    return split.select_columns([text_column])


def _num_chars(split: Dataset) -> int:
    return int(_row_lengths(split, split.column_names[0]).sum())


def _row_lengths(split: Dataset, column_name: str) -> np.ndarray:
    if split._indices is not None:
        split = split.flatten_indices()
    column = split.data.column(column_name)
    return pc.fill_null(pc.utf8_length(column), 0).to_numpy().astype(np.int64)


def _split_tail(split: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """Cut the concatenated text at character ``int(total * (1 - fraction))``: head -> train, tail -> val."""
    column_name = split.column_names[0]
    lengths = _row_lengths(split, column_name)
    total = int(lengths.sum())
    cut = int(total * (1.0 - fraction))
    if cut <= 0 or cut >= total:
        raise ValueError(
            f"the corpus ({total} characters) is too short to hold out a validation fraction of {fraction}; "
            "use a longer corpus or pass a validation_file"
        )
    ends = np.cumsum(lengths)
    row = int(np.searchsorted(ends, cut, side="right"))  # first row that is not wholly in train
    offset = cut - (int(ends[row - 1]) if row else 0)
    text = split[row][column_name] or ""
    head_rows = [split.select(range(row))] if row else []
    if offset:
        head_rows.append(_one_row(text[:offset], split))
    tail_rows = [_one_row(text[offset:], split)]
    if row + 1 < len(split):
        tail_rows.append(split.select(range(row + 1, len(split))))
    train = concatenate_datasets(head_rows)
    validation = concatenate_datasets(tail_rows)
    # Deterministic fingerprints, so that tokenize_to_array's cache hits across runs.
    train._fingerprint = _hash(split._fingerprint, "train", fraction)
    validation._fingerprint = _hash(split._fingerprint, "validation", fraction)
    return train, validation


def _one_row(text: str, like: Dataset) -> Dataset:
    return Dataset.from_dict({like.column_names[0]: [text]}, features=like.features)


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned/int dtype that holds ids below ``vocab_size`` (uint8, uint16, else int32)."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def tokenize_to_array(
    dataset_split: Dataset,
    tokenizer: Any,
    text_column: str = "text",
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    append_eos: bool = False,
) -> np.ndarray:
    """Tokenize every row of ``dataset_split`` and return the concatenated ids as one flat numpy array.

    Uses a batched ``Dataset.map`` (``num_proc`` capable, cached by datasets next to the dataset's cache
    files, or in ``cache_dir`` when given). Rows are concatenated in order with nothing between them,
    except the end-of-text id after each row when ``append_eos`` is set (document corpora). A
    character-level tokenizer (``tokenizer.is_char_level``) gets long texts in pieces, which is exact and
    bounds memory. A word-level tokenizer (:func:`~hf_txl.tokenization_txl.token_unit` "word") reads every row
    as whole lines: a row that does not end with a newline gets one, so the stream has one ``<eos>`` per line
    (a one-line row such as a WikiText-103 row, an empty row included, gives its words then ``<eos>``; a whole
    file loaded as one row gives one ``<eos>`` per line of the file), and long rows are cut after newlines. Unknown
    characters are counted in one ``UnknownCharacterWarning`` (not unknown words: a capped word vocabulary maps
    rare words to ``<unk>`` on purpose). The dtype is :func:`token_dtype`.
    """
    if text_column not in dataset_split.column_names:
        raise ValueError(f"text column {text_column!r} not found; available columns: {dataset_split.column_names}")
    dtype = token_dtype(len(tokenizer))
    eos_id = tokenizer.eos_token_id if append_eos else None
    if append_eos and eos_id is None:
        raise ValueError(
            "append_eos=True needs a tokenizer with an eos token: TxlCharTokenizer.from_corpus(add_eos=True)"
        )
    unit = token_unit(tokenizer)
    char_level = getattr(tokenizer, "is_char_level", False) or unit in ("char", "byte")
    encode = _BatchEncoder(tokenizer, text_column, dtype, eos_id, char_level, lines=unit == "word")

    map_kwargs: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a content hash of the tokenizer: stable across runs, no pickling involved
        parts = (dataset_split._fingerprint, backend.to_str(), text_column, dtype.str, eos_id, "v1")
        key = _hash(*parts, *(("lines",) if unit == "word" else ()))
        map_kwargs["new_fingerprint"] = key
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            map_kwargs["cache_file_name"] = os.path.join(os.fspath(cache_dir), f"tokens-{key}.arrow")
    tokenized = dataset_split.map(
        encode,
        batched=True,
        batch_size=256,
        remove_columns=dataset_split.column_names,
        features=Features({"input_ids": List(Value(dtype.name))}),
        num_proc=num_proc,
        desc="Tokenizing",
        **map_kwargs,
    )
    column = tokenized.data.column("input_ids")
    parts = [pc.list_flatten(chunk).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    ids = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    unk_id = getattr(tokenizer, "unk_token_id", None)
    n_unknown = int(np.count_nonzero(ids == unk_id)) if unk_id is not None and len(ids) and unit != "word" else 0
    if n_unknown:
        warnings.warn(
            f"{n_unknown} unknown character(s) in the corpus were encoded as {tokenizer.unk_token!r}; build "
            "the tokenizer from this corpus (or use TxlCharTokenizer.byte_level()) to keep them",
            UnknownCharacterWarning,
            stacklevel=2,
        )
    return ids


def separates_documents(tokenizer: Any, *splits: Dataset) -> bool:
    """Whether the rows of ``splits`` are documents to end with the eos (``tokenize_to_array(append_eos=...)``).

    True when a split has more than one row (a Hub dataset of documents), unless the tokenizer is word level (its
    rows are lines, each already ending with the ``<eos>`` word). A local text file or the bundled corpus is read
    whole, one row per split: one document, no eos. A tokenizer without an eos (one saved before hf_txl's
    tokenizers all had one) gives False, with a warning: its documents are joined with nothing between them.
    """
    if token_unit(tokenizer) == "word" or not any(len(split) > 1 for split in splits):
        return False
    if tokenizer.eos_token_id is None:
        warnings.warn(
            "the tokenizer has no eos token, so the documents (rows) of the corpus are joined with nothing between "
            "them; build a tokenizer with one (hf_txl's have <eos>) to separate them",
            stacklevel=2,
        )
        return False
    return True


class _BatchEncoder:
    """The ``map`` function: one batch of texts -> a few flat id arrays (one per ~1M characters)."""

    def __init__(
        self,
        tokenizer: Any,
        text_column: str,
        dtype: np.dtype,
        eos_id: int | None,
        char_level: bool,
        lines: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.dtype = dtype
        self.eos_id = eos_id
        self.char_level = char_level
        self.lines = lines  # word level: every row is whole lines (newline-terminated), cut after newlines
        self.fast_encode = fast_word_encoder(tokenizer) if lines else None

    def __call__(self, batch: dict[str, list]) -> dict[str, list[np.ndarray]]:
        rows: list[np.ndarray] = []
        group: list[str] = []
        ends_doc: list[bool] = []
        group_chars = 0
        for text in batch[self.text_column]:
            pieces = self._pieces(text or "")
            for i, piece in enumerate(pieces):
                group.append(piece)
                ends_doc.append(i == len(pieces) - 1)
                group_chars += len(piece)
                if group_chars >= _GROUP_CHARS:
                    rows.append(self._encode(group, ends_doc))
                    group, ends_doc, group_chars = [], [], 0
        if group:
            rows.append(self._encode(group, ends_doc))
        return {"input_ids": rows}

    def _pieces(self, text: str) -> list[str]:
        if self.lines:
            pieces = _line_pieces(text, _PIECE_CHARS)
            if not pieces[-1].endswith("\n"):
                pieces[-1] += "\n"  # the row's last line ends too: one <eos> per line, as in the paper
            return pieces
        if not self.char_level or len(text) <= _PIECE_CHARS:
            return [text]
        return [text[i : i + _PIECE_CHARS] for i in range(0, len(text), _PIECE_CHARS)]

    def _encode(self, texts: list[str], ends_doc: list[bool]) -> np.ndarray:
        if self.fast_encode is not None:  # word level: the pieces are whole lines, so they may be joined
            ids = [self.fast_encode("".join(texts))] if self.eos_id is None else list(map(self.fast_encode, texts))
        else:
            ids = self._encode_with_tokenizer(texts)
        if self.eos_id is not None:
            ids = [row + [self.eos_id] if end else row for row, end in zip(ids, ends_doc, strict=True)]
        return np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=sum(map(len, ids)))

    def _encode_with_tokenizer(self, texts: list[str]) -> list[list[int]]:
        with warnings.catch_warnings():  # counted once, over the whole stream, by tokenize_to_array
            warnings.simplefilter("ignore", UnknownCharacterWarning)
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _line_pieces(text: str, size: int) -> list[str]:
    """``text`` cut right after the first newline at or past every ``size`` characters (exact for word level)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size - 1)
        if cut < 0 or cut == len(text) - 1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def save_token_array(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Save a flat token array as ``.npy`` (no pickle); reload it memory-mapped: :func:`load_token_array`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"expected a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    np.save(path, tokens, allow_pickle=False)


def load_token_array(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load a ``.npy`` token array, memory-mapped read-only by default."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token array not found: {os.fspath(path)!r}")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# ----------------------------------------------------------------------------------------------------
# Stream batching
# ----------------------------------------------------------------------------------------------------


class StreamBatcher:
    """Per-process batches of contiguous streams for a recurrent-memory LM (Transformer-XL).

    The token stream is cut into ``S = batch_size * num_processes`` contiguous streams of
    ``L = (N - 1) // S`` inputs each (the tail remainder is dropped); process ``p`` owns streams
    ``[p*batch_size, (p+1)*batch_size)``.
    Step ``t`` gives every row its ``t``-th segment of ``tgt_len`` inputs (the last one of an epoch may be
    shorter), with ``shift_labels`` = the next token of the stream, so no target is lost at segment boundaries
    and the inputs of all processes cover ``tokens[:S*L]`` exactly once.

    Iteration resumes from the current position; iterating again after the end starts the next epoch.
    ``new_epoch`` is True while the last yielded batch is the first of an epoch (reset the memory then).
    ``state_dict()``/``load_state_dict()`` save and restore the position (JSON-serialisable).
    Do NOT pass a StreamBatcher through ``accelerator.prepare``: it is already per process.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        *,
        batch_size: int,
        tgt_len: int,
        num_processes: int = 1,
        process_index: int = 0,
        device: torch.device | str | None = None,
    ):
        tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape}, {tokens.dtype}")
        sizes = {"batch_size": batch_size, "tgt_len": tgt_len, "num_processes": num_processes}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        num_streams = batch_size * num_processes
        stream_len = (len(tokens) - 1) // num_streams if len(tokens) else 0
        if stream_len < tgt_len:
            raise ValueError(
                f"the token stream ({len(tokens)} tokens) is shorter than one batch of segments: "
                f"{num_streams} streams (batch_size={batch_size} x num_processes={num_processes}) of "
                f"tgt_len={tgt_len} need at least {num_streams * tgt_len + 1} tokens; "
                "reduce batch_size or tgt_len, or use a longer corpus"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.tgt_len = tgt_len
        self.num_processes = num_processes
        self.process_index = process_index
        self.device = device
        self.num_streams = num_streams
        self.stream_len = stream_len
        first = process_index * batch_size
        self.row_starts = np.arange(first, first + batch_size, dtype=np.int64) * stream_len
        self._epoch = 0
        self._step = 0
        self._last_step: int | None = None

    @classmethod
    def from_accelerator(
        cls,
        tokens: np.ndarray | torch.Tensor,
        accelerator: Any,
        *,
        batch_size: int,
        tgt_len: int,
        device: torch.device | str | None = None,
    ) -> StreamBatcher:
        """This process's batcher: ``num_processes``/``process_index`` (and the device) from an Accelerator.

        ``batch_size`` is per device. Use the result directly; do not ``accelerator.prepare`` it.
        """
        return cls(
            tokens,
            batch_size=batch_size,
            tgt_len=tgt_len,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            device=device if device is not None else accelerator.device,
        )

    def __len__(self) -> int:
        """Number of segments (batches) per epoch."""
        return -(-self.stream_len // self.tgt_len)

    @property
    def epoch(self) -> int:
        """Current epoch (0-based)."""
        return self._epoch

    @property
    def step(self) -> int:
        """Number of batches already yielded in the current epoch."""
        return self._step

    @property
    def new_epoch(self) -> bool:
        """True when the most recently yielded batch is the first one of its epoch."""
        return self._last_step == 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._step >= len(self):
            self._epoch += 1
            self._step = 0
        while self._step < len(self):
            batch = self.batch_at(self._step)
            self._last_step = self._step
            self._step += 1
            yield batch

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of segment ``step`` (no change of position)."""
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range [0, {len(self)})")
        start = step * self.tgt_len
        stop = min(start + self.tgt_len, self.stream_len)
        window = np.stack([self.tokens[s + start : s + stop + 1] for s in self.row_starts])
        window = torch.from_numpy(window.astype(np.int64))
        batch = {"input_ids": window[:, :-1].contiguous(), "shift_labels": window[:, 1:].contiguous()}
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch

    def reset(self) -> None:
        """Go back to the start of epoch 0 (e.g. before each evaluation pass)."""
        self._epoch, self._step, self._last_step = 0, 0, None

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, step) plus the settings that must match on restore; JSON-serialisable."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "num_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "tgt_len": self.tgt_len,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`; ValueError when the settings differ."""
        current = self.state_dict()
        mismatched = {
            k: (state.get(k), current[k])
            for k in ("num_tokens", "batch_size", "tgt_len", "num_processes")
            if state.get(k) != current[k]
        }
        if mismatched:
            details = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume the stream position, settings differ ({details})")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= len(self):
            raise ValueError(f"invalid saved position epoch={epoch} step={step} ({len(self)} steps/epoch)")
        self._epoch, self._step, self._last_step = epoch, step, None
