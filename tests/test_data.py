"""Corpus loading, tokenization to a flat array, and the stream batcher of the recurrent-memory LM."""

import contextlib
import hashlib
import json
import os
import types
import warnings

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset

from hf_txl import TxlCharTokenizer, UnknownCharacterWarning
from hf_txl.training.data import (
    DEFAULT_CORPUS_PATH,
    StreamBatcher,
    load_corpus,
    load_token_array,
    save_token_array,
    token_dtype,
    tokenize_to_array,
)

SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_CHARS = 1_115_394


@pytest.fixture(scope="module")
def shakespeare() -> str:
    with open(DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(cache_dir=tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def char_tok(shakespeare) -> TxlCharTokenizer:
    return TxlCharTokenizer.from_corpus([shakespeare])


def write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------------------


def test_bundled_corpus_md5():
    with open(DEFAULT_CORPUS_PATH, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == SHAKESPEARE_MD5


def test_default_corpus_keeps_every_character_and_holds_out_the_last_10_percent(corpus, shakespeare):
    assert len(shakespeare) == SHAKESPEARE_CHARS
    assert set(corpus) == {"train", "validation"}
    assert corpus["train"].column_names == ["text"] == corpus["validation"].column_names
    train, validation = "".join(corpus["train"]["text"]), "".join(corpus["validation"]["text"])
    assert train + validation == shakespeare  # newlines included
    assert len(train) == int(SHAKESPEARE_CHARS * 0.9) == 1_003_854


def test_local_files_with_their_own_validation_split(tmp_path):
    train = write(tmp_path / "train.txt", "line one\n\nline  three\t\n")
    valid = write(tmp_path / "valid.txt", "held out\n")
    corpus = load_corpus(train_file=train, validation_file=valid, cache_dir=tmp_path / "cache")
    assert "".join(corpus["train"]["text"]) == "line one\n\nline  three\t\n"
    assert "".join(corpus["validation"]["text"]) == "held out\n"


def test_local_files_contact_no_host_when_the_hub_is_online(tmp_path, monkeypatch):
    """The quickstart leaves HF_HUB_OFFLINE unset: loading local text (the bundled corpus, --train_file) must still
    contact no host. datasets' loader of its packaged "text" builder sends a HEAD request to count the load unless
    offline; load_corpus turns that counter off for local files."""
    import socket

    import datasets.config
    import huggingface_hub.constants

    # the test command runs offline (HF_HUB_OFFLINE=1): undo that here, for datasets and for the Hub's HTTP session
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    hosts = []

    def no_network(host, *args, **kwargs):
        hosts.append(host)
        raise OSError(f"this test has no network ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    path = tmp_path / "train.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    corpus = load_corpus(train_file=path, cache_dir=tmp_path / "cache")
    assert hosts == []
    assert corpus["train"].num_rows == 1 and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is True  # setting restored


def test_dataset_with_text_column_and_tail_split_across_rows(tmp_path):
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", [{"id": i, "content": t} for i, t in enumerate(["abc", "defgh", "ij"])])
    corpus = load_corpus(str(data_dir), text_column="content", validation_fraction=0.25, cache_dir=tmp_path / "c")
    assert corpus["train"].column_names == ["content"] == corpus["validation"].column_names
    assert corpus["train"]["content"] == ["abc", "defg"]  # cut at character int(10 * 0.75) = 7
    assert corpus["validation"]["content"] == ["h", "ij"]
    tok = TxlCharTokenizer.from_corpus("abcdefghij")
    assert tokenize_to_array(corpus["train"], tok, text_column="content").tolist() == tok.encode("abcdefg")
    with pytest.raises(ValueError, match=r"text column 'body' not found.*\['id', 'content'\]"):
        load_corpus(str(data_dir), text_column="body", cache_dir=tmp_path / "c")


def test_dataset_own_validation_split_is_used(tmp_path):
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", [{"text": "training text"}])
    write_jsonl(data_dir / "validation.jsonl", [{"text": "validation text"}])
    corpus = load_corpus(str(data_dir), cache_dir=tmp_path / "c")
    assert corpus["train"]["text"] == ["training text"]
    assert corpus["validation"]["text"] == ["validation text"]


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file"):
        load_corpus(train_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(train_file=write(tmp_path / "empty.txt", ""), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="too short"):
        load_corpus(train_file=write(tmp_path / "one.txt", "x"), cache_dir=tmp_path / "c")
    for fraction in (0, 0.0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
            load_corpus(validation_fraction=fraction)
    with pytest.raises(ValueError, match="either"):
        load_corpus("some/dataset", train_file=DEFAULT_CORPUS_PATH)


def test_carriage_returns_are_reported(tmp_path):
    with pytest.warns(UserWarning, match="universal"):
        load_corpus(train_file=write(tmp_path / "crlf.txt", "a\r\nb\r\n" * 10), cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------------------


def test_token_dtype():
    assert token_dtype(67) == np.uint8 and token_dtype(256) == np.uint8
    assert token_dtype(258) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


def test_tokenize_whole_corpus_exactly(corpus, char_tok, tmp_path):
    train = tokenize_to_array(corpus["train"], char_tok, cache_dir=tmp_path)
    validation = tokenize_to_array(corpus["validation"], char_tok, cache_dir=tmp_path)
    assert isinstance(train, np.ndarray) and train.ndim == 1 and train.dtype == np.uint8
    text = "".join(corpus["train"]["text"]) + "".join(corpus["validation"]["text"])
    both = np.concatenate([train, validation])
    assert len(both) == SHAKESPEARE_CHARS
    assert char_tok.decode(both.tolist()) == text
    assert [f for f in os.listdir(tmp_path) if f.endswith(".arrow")]  # the map result is cached there
    assert np.array_equal(tokenize_to_array(corpus["train"], char_tok, cache_dir=tmp_path), train)


def test_tokenize_rows_in_order_with_eos_and_num_proc(tmp_path):
    rows = ["first doc\n", "", "second\tdoc", "third 😀"]
    corpus = load_corpus(train_file=write(tmp_path / "t.txt", "unused"), cache_dir=tmp_path / "c")
    split = corpus["train"].from_dict({"text": rows})
    tok = TxlCharTokenizer.from_corpus(rows, add_eos=True)
    eos = tok.eos_token_id
    plain = tokenize_to_array(split, tok)
    assert plain.tolist() == tok.encode("".join(rows))
    with_eos = tokenize_to_array(split, tok, append_eos=True)
    expected = [i for row in rows for i in tok.encode(row) + [eos]]
    assert with_eos.tolist() == expected
    assert np.array_equal(tokenize_to_array(split, tok, num_proc=2, append_eos=True), with_eos)
    with pytest.raises(ValueError, match="eos"):
        tokenize_to_array(split, TxlCharTokenizer.from_corpus(rows, add_eos=False), append_eos=True)
    with pytest.raises(ValueError, match="text column 'body' not found"):
        tokenize_to_array(split, tok, text_column="body")


def token_streams(tmp_path, monkeypatch, *flags):
    """hf_txl.train's (tokenizer, train ids, validation ids) for these flags, with the datasets cache in tmp_path."""
    import datasets

    from hf_txl.training.args import parse_args
    from hf_txl.training.train import get_token_streams

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    args = parse_args(["--preset", "tiny", "--output_dir", str(tmp_path / "out"), *flags])
    one_process = types.SimpleNamespace(main_process_first=contextlib.nullcontext)  # all an Accelerator gives here
    return get_token_streams(args, one_process)


DOCUMENTS = {"train": ["First document.\nTwo lines", "", "Second: é"], "validation": ["third one\n", "fourth"]}


def test_training_streams_end_every_document_of_a_multi_row_dataset_with_eos(tmp_path, monkeypatch):
    data_dir = tmp_path / "documents"
    for split, rows in DOCUMENTS.items():  # a local dataset of documents, loaded as a Hub one is (--dataset_name)
        Dataset.from_dict({"text": rows, "id": list(range(len(rows)))}).to_json(data_dir / f"{split}.jsonl")
    tok, train, validation = token_streams(tmp_path, monkeypatch, "--dataset_name", str(data_dir))
    eos = tok.eos_token_id
    assert eos is not None
    for ids, rows in ((train, DOCUMENTS["train"]), (validation, DOCUMENTS["validation"])):
        assert ids.tolist() == [i for row in rows for i in [*tok.encode(row), eos]]  # the empty row too

    # a word tokenizer's rows are lines: each already ends with its <eos>, so nothing is added
    tok, train, _ = token_streams(tmp_path, monkeypatch, "--dataset_name", str(data_dir), "--tokenizer", "word")
    assert tok.eos_token_id == tok.line_end_token_id
    assert train.tolist() == tok.encode("".join(row + "\n" for row in DOCUMENTS["train"]))

    # a tokenizer saved without an eos (before every tokenizer had one) joins them as before, and says so
    old = TxlCharTokenizer.from_corpus(["".join(DOCUMENTS["train"] + DOCUMENTS["validation"])], add_eos=False)
    old.save_pretrained(tmp_path / "old_tok")
    flags = ("--dataset_name", str(data_dir), "--tokenizer_name", str(tmp_path / "old_tok"))
    with pytest.warns(UserWarning, match="the tokenizer has no eos token, so the documents .* nothing between"):
        tok, train, _ = token_streams(tmp_path, monkeypatch, *flags)
    assert tok.eos_token_id is None and train.tolist() == tok.encode("".join(DOCUMENTS["train"]))


def test_training_streams_of_one_file_have_no_eos(tmp_path, monkeypatch):
    text = "A whole file is one document.\n\nEven with blank lines.\n" * 4
    flags = ("--train_file", write(tmp_path / "t.txt", text), "--validation_split_fraction", "0.25")
    tok, train, validation = token_streams(tmp_path, monkeypatch, *flags)
    assert tok.eos_token_id is not None
    assert train.tolist() + validation.tolist() == tok.encode(text)  # the bundled corpus is read the same way


def test_tokenize_byte_level(tmp_path):
    text = "Ωμέγα 😀 bytes\n" * 3
    split = load_corpus(train_file=write(tmp_path / "b.txt", text), cache_dir=tmp_path / "c")["train"]
    ids = tokenize_to_array(split, TxlCharTokenizer.byte_level())
    assert ids.dtype == np.uint16
    head = "".join(split["text"])
    assert ids.tolist() == list(head.encode("utf-8"))


def test_unknown_characters_warn_once_with_the_total(tmp_path):
    tok = TxlCharTokenizer.from_corpus(["abc"])
    split = load_corpus(train_file=write(tmp_path / "u.txt", "abxcyz" * 10), cache_dir=tmp_path / "c")["train"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenize_to_array(split, tok)
    unknown = [w for w in caught if issubclass(w.category, UnknownCharacterWarning)]
    n_unk = int((ids == tok.unk_token_id).sum())
    assert len(unknown) == 1 and str(unknown[0].message).startswith(f"{n_unk} unknown")
    assert len(ids) == len("".join(split["text"])) and n_unk > 0


def test_token_array_save_and_memmap_load(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    save_token_array(tmp_path / "ids.npy", tokens)
    loaded = load_token_array(tmp_path / "ids.npy")
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert np.array_equal(loaded, tokens)
    assert not isinstance(load_token_array(tmp_path / "ids.npy", mmap=False), np.memmap)
    with pytest.raises(ValueError):
        save_token_array(tmp_path / "bad.npy", np.array(["a", "b"], dtype=object))
    with pytest.raises(FileNotFoundError):
        load_token_array(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------------------------
# Stream batching
# ------------------------------------------------------------------------------------------------------------


def collect(batcher):
    return [(b["input_ids"].clone(), b["shift_labels"].clone()) for b in batcher]


def test_continuity_and_next_token_labels():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, size=1003).astype(np.uint8)
    batcher = StreamBatcher(tokens, batch_size=4, tgt_len=16)
    L = batcher.stream_len
    assert L == (1003 - 1) // 4 == 250 and len(batcher) == 16  # 15 full segments and a last one of 10
    batches = collect(batcher)
    assert [x.shape for x, _ in batches] == [(4, 16)] * 15 + [(4, 10)]
    assert all(x.dtype == torch.long and y.dtype == torch.long for x, y in batches)
    for r in range(4):
        row_inputs = torch.cat([x[r] for x, _ in batches]).numpy()
        row_labels = torch.cat([y[r] for _, y in batches]).numpy()
        # row r at step t+1 continues row r at step t: the row is one contiguous stream
        assert np.array_equal(row_inputs, tokens[r * L : (r + 1) * L])
        assert np.array_equal(row_labels, tokens[r * L + 1 : (r + 1) * L + 1])  # the next token, boundaries too
    for (_, y0), (x1, _) in zip(batches, batches[1:], strict=False):
        assert torch.equal(y0[:, -1], x1[:, 0])  # the target of a segment's last token starts the next one


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_process_partition_covers_the_corpus_exactly_once(num_processes):
    tokens = np.arange(10_000, dtype=np.int64)
    batch_size = 3
    rows = []
    for p in range(num_processes):
        batcher = StreamBatcher(tokens, batch_size=batch_size, tgt_len=7, num_processes=num_processes, process_index=p)
        assert batcher.num_streams == batch_size * num_processes
        batches = collect(batcher)
        proc_rows = [torch.cat([x[r] for x, _ in batches]).numpy() for r in range(batch_size)]
        for r, row in enumerate(proc_rows):  # process p owns streams [p*B, (p+1)*B)
            s = p * batch_size + r
            assert row[0] == s * batcher.stream_len and np.all(np.diff(row) == 1)
        rows.extend(proc_rows)
    covered = np.concatenate(rows)
    S = batch_size * num_processes
    L = (len(tokens) - 1) // S
    assert len(covered) == S * L and np.array_equal(covered, tokens[: S * L])  # in order, no overlap, no gap


def test_evaluation_batcher_covers_the_validation_stream_in_order():
    tokens = np.random.default_rng(1).integers(0, 60, size=777).astype(np.uint8)
    batcher = StreamBatcher(tokens, batch_size=1, tgt_len=50)
    batches = collect(batcher)
    assert np.array_equal(torch.cat([x[0] for x, _ in batches]).numpy(), tokens[:-1])
    assert np.array_equal(torch.cat([y[0] for _, y in batches]).numpy(), tokens[1:])


def test_epochs_and_new_epoch_flag():
    batcher = StreamBatcher(np.arange(101), batch_size=2, tgt_len=10)
    flags = []
    first = []
    for batch in batcher:
        flags.append(batcher.new_epoch)
        first.append(batch["input_ids"])
    assert flags == [True] + [False] * (len(batcher) - 1) and batcher.epoch == 0
    second = [b["input_ids"] for b in batcher]  # iterating again starts the next epoch
    assert batcher.epoch == 1 and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    batcher.reset()
    assert (batcher.epoch, batcher.step) == (0, 0)


@pytest.mark.parametrize("interrupt_at", [0, 3, 5, 7, 12])
def test_save_and_restore_resumes_the_exact_batches(interrupt_at):
    tokens = np.random.default_rng(2).integers(0, 100, size=500).astype(np.uint8)

    def make():
        return StreamBatcher(tokens, batch_size=3, tgt_len=32, num_processes=2, process_index=1)

    assert len(make()) == 3  # 83 inputs per stream: 32 + 32 + 19
    reference = make()
    expected = [b["input_ids"] for _ in range(5) for b in reference][:15]

    run = make()
    seen = []
    while len(seen) < interrupt_at:
        for batch in run:
            seen.append(batch["input_ids"])
            if len(seen) == interrupt_at:
                break
    state = json.loads(json.dumps(run.state_dict()))  # JSON-serialisable
    assert state["epoch"] == ((interrupt_at - 1) // 3 if interrupt_at else 0)
    resumed = make()
    resumed.load_state_dict(state)
    while len(seen) < 15:
        seen.extend(b["input_ids"] for b in resumed)
    assert all(torch.equal(a, b) for a, b in zip(seen[:15], expected, strict=True))


def test_incompatible_state_is_rejected():
    batcher = StreamBatcher(np.arange(1000), batch_size=2, tgt_len=10)
    state = batcher.state_dict()
    for key, value in (("num_tokens", 999), ("batch_size", 4), ("tgt_len", 20), ("num_processes", 2)):
        with pytest.raises(ValueError, match=key):
            batcher.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="invalid saved position"):
        batcher.load_state_dict({**state, "step": len(batcher) + 1})


def test_batcher_errors():
    tokens = np.arange(100)
    with pytest.raises(ValueError, match="tgt_len must be an integer >= 1"):
        StreamBatcher(tokens, batch_size=2, tgt_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        StreamBatcher(tokens, batch_size=0, tgt_len=4)
    with pytest.raises(ValueError, match="shorter than one batch of segments.*reduce batch_size or tgt_len"):
        StreamBatcher(tokens, batch_size=10, tgt_len=10)  # needs 10 * 10 + 1 tokens
    StreamBatcher(np.arange(101), batch_size=10, tgt_len=10)  # exactly enough
    with pytest.raises(ValueError, match="shorter than one batch"):
        StreamBatcher(np.zeros(0, dtype=np.int64), batch_size=1, tgt_len=1)
    with pytest.raises(ValueError, match="process_index"):
        StreamBatcher(tokens, batch_size=1, tgt_len=4, num_processes=2, process_index=2)
    with pytest.raises(ValueError, match="1-D integer"):
        StreamBatcher(np.zeros((10, 10)), batch_size=1, tgt_len=4)


def test_from_accelerator_takes_the_process_layout_and_device():
    tokens = np.arange(1000)
    fake = types.SimpleNamespace(num_processes=3, process_index=2, device=torch.device("cpu"))
    batcher = StreamBatcher.from_accelerator(tokens, fake, batch_size=2, tgt_len=5)
    direct = StreamBatcher(tokens, batch_size=2, tgt_len=5, num_processes=3, process_index=2)
    assert (batcher.num_processes, batcher.process_index, batcher.device) == (3, 2, torch.device("cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(collect(batcher), collect(direct), strict=True))


def test_from_real_accelerator():
    accelerator = Accelerator(cpu=True)
    batcher = StreamBatcher.from_accelerator(np.arange(1000), accelerator, batch_size=2, tgt_len=5)
    assert (batcher.num_processes, batcher.process_index) == (accelerator.num_processes, accelerator.process_index)
    assert next(iter(batcher))["input_ids"].device == accelerator.device


def test_memmapped_tokens_stream_like_in_memory(tmp_path):
    tokens = np.random.default_rng(3).integers(0, 250, size=5000).astype(np.uint8)
    save_token_array(tmp_path / "t.npy", tokens)
    a = collect(StreamBatcher(load_token_array(tmp_path / "t.npy"), batch_size=4, tgt_len=64))
    b = collect(StreamBatcher(tokens, batch_size=4, tgt_len=64))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def test_batches_feed_the_model_loss_without_a_second_shift():
    from hf_txl import TxlConfig, TxlForCausalLM

    config = TxlConfig(
        vocab_size=40, d_model=32, n_layer=2, n_head=4, d_head=8, d_inner=64, mem_len=16, dropout=0.0, dropatt=0.0
    )
    model = TxlForCausalLM(config).eval()
    batch = next(iter(StreamBatcher(np.random.default_rng(4).integers(0, 40, 500), batch_size=2, tgt_len=8)))
    with torch.no_grad():
        out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 40).float(), batch["shift_labels"].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)
