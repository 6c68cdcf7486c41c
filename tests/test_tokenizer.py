"""TxlCharTokenizer and TxlWordTokenizer: vocabulary order, round trips, unknown symbols, saving, clean-env loading."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from hf_txl import DEFAULT_CORPUS_PATH, TxlCharTokenizer, TxlWordTokenizer, UnknownCharacterWarning
from hf_txl.tokenization_txl import (
    TOKENIZER_KINDS,
    build_tokenizer,
    fast_word_encoder,
    generation_eos_token_id,
    token_unit,
)

ADVERSARIAL = [
    "",
    " ",
    "\t\t \t",
    "\n\n\n",
    "  leading and trailing  ",
    "a  b   c\n \n\t\n",
    "windows\r\nline\rends",
    "Café naïve Ærøskøbing ß ğ Ωμέγα Кириллица 中文 日本語 한국어",
    "😀 👨‍👩‍👧 🏳️‍🌈 👍🏽",  # emoji, ZWJ sequences, variation selectors, skin tones
    "e\u0301 combining, \u00a0nbsp, \u200bzero-width, \u2028line-sep, \ufeffbom",
    "\x00\x01\x7f control",
    "<unk> <pad> <eos> look like special tokens",
    "▁Ġ ## </w> subword markers",
]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    with open(DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def char_tok(shakespeare) -> TxlCharTokenizer:
    return TxlCharTokenizer.from_corpus([shakespeare])


def test_vocabulary_is_deterministic_and_special_tokens_come_first():
    tok = TxlCharTokenizer.from_corpus(["hello", "world\n"])
    again = TxlCharTokenizer.from_corpus(iter(["\nworld", "olleh"]))  # other order, same characters
    assert tok.get_vocab() == again.get_vocab()
    specials = ["<unk>", "<pad>", "<eos>"]
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == specials + sorted(set("helloworld\n"))
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == tok.vocab_size == 3 + len(set("helloworld\n"))
    without_eos = TxlCharTokenizer.from_corpus(["hello"], add_eos=False)  # the vocabulary before eos was the default
    assert without_eos.convert_ids_to_tokens(list(range(len(without_eos)))) == ["<unk>", "<pad>"] + sorted("helo")
    assert (without_eos.unk_token_id, without_eos.pad_token_id, without_eos.eos_token_id) == (0, 1, None)


def test_shakespeare_vocabulary(char_tok, shakespeare):
    assert len(set(shakespeare)) == 65
    assert len(char_tok) == 68


def test_whole_corpus_round_trip(char_tok, shakespeare):
    ids = char_tok(shakespeare)["input_ids"]
    assert len(ids) == len(shakespeare)  # one token per character, nothing added or dropped
    assert char_tok.unk_token_id not in ids
    assert char_tok.decode(ids) == shakespeare
    lines = shakespeare.splitlines(keepends=True)
    batch = char_tok(lines, return_attention_mask=False)["input_ids"]
    assert "".join(char_tok.batch_decode(batch)) == shakespeare


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_round_trip(text):
    tok = TxlCharTokenizer.from_corpus(ADVERSARIAL, add_eos=True)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids and tok.unk_token_id not in ids
    byte_tok = TxlCharTokenizer.byte_level(add_eos=True)
    byte_ids = byte_tok.encode(text)
    assert byte_ids == list(text.encode("utf-8"))
    assert byte_tok.decode(byte_ids) == text


def test_batch_decode_round_trip_on_all_adversarial_strings():
    tok = TxlCharTokenizer.from_corpus(ADVERSARIAL)
    assert tok.batch_decode(tok(ADVERSARIAL)["input_ids"]) == ADVERSARIAL
    assert tok.decode(tok.encode("".join(ADVERSARIAL))) == "".join(ADVERSARIAL)


def test_literal_special_token_strings_are_plain_characters():
    tok = TxlCharTokenizer.from_corpus(["<eos><unk>"], add_eos=True)
    ids = tok.encode("<eos>")
    assert len(ids) == 5 and tok.eos_token_id not in ids
    assert tok.decode(ids) == "<eos>"


def test_unknown_characters_become_unk_and_are_counted(char_tok):
    with pytest.warns(UnknownCharacterWarning, match=r"^3 unknown character\(s\).*€"):
        ids = char_tok("a€b€€")["input_ids"]
    unk = char_tok.unk_token_id
    assert ids[0] != unk and ids[2] != unk
    assert [ids[1], ids[3], ids[4]] == [unk] * 3  # nothing silently dropped
    with pytest.warns(UnknownCharacterWarning, match=r"^2 unknown"):
        char_tok(["ok", "é", "ü"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownCharacterWarning)
        char_tok("all known")


def test_byte_level_vocabulary():
    tok = TxlCharTokenizer.byte_level()
    assert len(tok) == tok.vocab_size == 259
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.encode("\x00\xff") == [0, 0xC3, 0xBF]
    without_eos = TxlCharTokenizer.byte_level(add_eos=False)
    assert len(without_eos) == 258 and without_eos.eos_token_id is None


def test_left_padding_by_default(char_tok):
    assert char_tok.padding_side == "left"
    out = char_tok(["ab", "abcd"], padding=True)
    pad = char_tok.pad_token_id
    assert out["input_ids"][0][:2] == [pad, pad]
    assert out["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert char_tok.batch_decode(out["input_ids"], skip_special_tokens=True) == ["ab", "abcd"]


def test_bad_corpus_inputs():
    with pytest.raises(ValueError, match="empty corpus"):
        TxlCharTokenizer.from_corpus(["", ""])
    with pytest.raises(ValueError, match="also corpus characters"):
        TxlCharTokenizer.from_corpus(["a<b"], unk_token="<")
    with pytest.raises(TypeError):
        TxlCharTokenizer.from_corpus([b"bytes"])


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_save_and_reload(tmp_path, kind, shakespeare):
    tok = TxlCharTokenizer.from_corpus([shakespeare]) if kind == "char" else TxlCharTokenizer.byte_level()
    tok.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt"))]
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "TokenizersBackend"
    assert config["padding_side"] == "left" and config["split_special_tokens"] is True
    reloaded = TxlCharTokenizer.from_pretrained(tmp_path)
    sample = shakespeare[:2000] + ADVERSARIAL[7] * (kind == "byte")
    assert reloaded.encode(sample) == tok.encode(sample)
    assert (reloaded.unk_token_id, reloaded.pad_token_id, reloaded.eos_token_id) == (
        tok.unk_token_id,
        tok.pad_token_id,
        tok.eos_token_id,
    )


def save_as_before_eos(kind: str, text: str, directory) -> None:
    """A tokenizer directory as hf_txl saved it before every tokenizer had an eos. Char and byte: what
    ``add_eos=False`` saves (the same files, byte for byte). Word: today's files without ``<eos>`` named as the
    eos_token (then an ordinary word of the vocabulary, not an added special token)."""
    if kind == "char":
        TxlCharTokenizer.from_corpus([text], add_eos=False).save_pretrained(directory)
    elif kind == "byte":
        TxlCharTokenizer.byte_level(add_eos=False).save_pretrained(directory)
    else:
        TxlWordTokenizer.from_corpus([text]).save_pretrained(directory)
        spec = json.loads((directory / "tokenizer.json").read_text())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<eos>"]
        (directory / "tokenizer.json").write_text(json.dumps(spec))
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizers_saved_without_an_eos_load_and_work_as_before(tmp_path, kind, shakespeare):
    from transformers import AutoTokenizer

    text = shakespeare[:3000]
    save_as_before_eos(kind, text, tmp_path)
    old = AutoTokenizer.from_pretrained(tmp_path)
    assert old.eos_token_id is None and generation_eos_token_id(old) is None and token_unit(old) == kind
    ids = old.encode(text)
    if kind == "word":  # today's vocabulary; the line ends are ordinary words, kept by skip_special_tokens
        assert ids == TxlWordTokenizer.from_corpus([text]).encode(text) and fast_word_encoder(old)(text) == ids
        lines = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        assert old.decode(ids, skip_special_tokens=True) == old.decode(ids) == lines
        return
    if kind == "char":  # <unk> 0, <pad> 1, then the characters (one id lower than with the eos)
        assert (old.unk_token_id, old.pad_token_id) == (0, 1) and ids == [sorted(set(text)).index(c) + 2 for c in text]
    else:  # byte b at id b, <unk> 256, <pad> 257
        assert (old.unk_token_id, old.pad_token_id, len(old)) == (256, 257, 258) and ids == list(text.encode())
    assert old.decode(ids) == text


CLEAN_ENV_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockHfTxl(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_txl" or name.startswith("hf_txl."):
                raise ImportError("hf_txl is blocked in this clean environment")
            return None

    sys.meta_path.insert(0, BlockHfTxl())
    try:
        import hf_txl  # noqa: F401
        importable = True
    except ImportError:
        importable = False

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    text = json.loads(sys.argv[2])
    ids = tok(text)["input_ids"]
    print(json.dumps({
        "hf_txl_importable": importable,
        "hf_txl_loaded": any(m == "hf_txl" or m.startswith("hf_txl.") for m in sys.modules),
        "class": type(tok).__name__,
        "ids": ids,
        "decoded": tok.decode(ids),
        "special_ids": [tok.unk_token_id, tok.pad_token_id, tok.eos_token_id],
        "len": len(tok),
        "padding_side": tok.padding_side,
    }))
    """
)


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_auto_tokenizer_loads_without_hf_txl(tmp_path, kind, shakespeare):
    tok = {
        "char": lambda: TxlCharTokenizer.from_corpus([shakespeare, "<eos>\t"], add_eos=True),
        "byte": lambda: TxlCharTokenizer.byte_level(add_eos=True),
        "word": lambda: TxlWordTokenizer.from_corpus([shakespeare[:300]], max_vocab_size=30),
    }[kind]()
    save_dir = tmp_path / "tok"
    tok.save_pretrained(save_dir)
    script = tmp_path / "load_clean.py"
    script.write_text(CLEAN_ENV_SCRIPT, encoding="utf-8")
    text = shakespeare[:500] + " \t\n  <eos> " + ("Ωμέγα 😀" if kind == "byte" else "")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(save_dir), json.dumps(text)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hf_txl_importable"] is False and result["hf_txl_loaded"] is False
    assert result["class"] == "TokenizersBackend"
    assert result["ids"] == tok(text)["input_ids"]
    if kind == "word":  # whitespace normalised, unknown words <unk>; the line ends come back
        assert result["decoded"] == tok.decode(result["ids"])
        assert result["decoded"].count("\n") == text.count("\n") + 1 and "\t" not in result["decoded"]
        assert tok.unk_token_id in result["ids"] and len(result["ids"]) == len(text.split()) + text.count("\n")
    else:
        assert result["decoded"] == text
    assert result["special_ids"] == [tok.unk_token_id, tok.pad_token_id, tok.eos_token_id]
    assert result["len"] == len(tok)
    assert result["padding_side"] == "left"


# --- word level ------------------------------------------------------------------------------------------


WORD_CORPUS = ["the cat sat on the mat\n", "the dog sat\n", "", "a <unk> word\n", "the end"]


@pytest.fixture(scope="module")
def word_tok() -> TxlWordTokenizer:
    return TxlWordTokenizer.from_corpus(WORD_CORPUS)


def test_word_vocabulary_specials_then_most_frequent_first_ties_in_code_point_order(word_tok):
    words = word_tok.convert_ids_to_tokens(list(range(len(word_tok))))
    # the x4, sat x2, then the words seen once in code point order; the corpus' own "<unk>" is the special one
    assert words == ["<unk>", "<pad>", "<eos>", "the", "sat", "a", "cat", "dog", "end", "mat", "on", "word"]
    assert (word_tok.unk_token_id, word_tok.pad_token_id, word_tok.line_end_token_id) == (0, 1, 2)
    assert word_tok.eos_token_id == 2  # the end-of-text token is the line end: what precedes a text
    assert generation_eos_token_id(word_tok) is None  # but generation goes on across lines
    assert len(word_tok) == word_tok.vocab_size == 12
    again = TxlWordTokenizer.from_corpus(iter(reversed(WORD_CORPUS)))
    assert again.get_vocab() == word_tok.get_vocab()
    assert word_tok.padding_side == "left" and not word_tok.is_char_level


def test_word_encoding_one_eos_per_line_and_unknown_words(word_tok):
    ids = word_tok("the cat\n\n  sat \t on a\tzebra\nx<unk>y <unk>", add_special_tokens=False)["input_ids"]
    tokens = word_tok.convert_ids_to_tokens(ids)
    assert tokens == ["the", "cat", "<eos>", "<eos>", "sat", "on", "a", "<unk>", "<eos>", "<unk>", "<unk>"]
    assert word_tok("<eos> <pad>")["input_ids"] == [2, 1]  # the special words written out are those words


def test_word_decode_joins_with_spaces_and_turns_eos_into_newlines(word_tok):
    text = "the cat\n\n  sat \t on the mat \nthe end\n"
    ids = word_tok(text)["input_ids"]
    assert word_tok.decode(ids) == "the cat\n\nsat on the mat\nthe end\n"
    assert word_tok.decode(ids, skip_special_tokens=True) == "the cat sat on the mat the end"  # <eos> is special
    assert word_tok.decode([2, 3, 2, 2, 0, 2]) == "\nthe\n\n<unk>\n"
    assert word_tok.decode([3, 0, 5], skip_special_tokens=True) == "the a"
    batch = word_tok(["the", "the cat sat"], padding=True)
    assert batch["input_ids"][0][:2] == [1, 1]
    assert word_tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["the", "the cat sat"]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_word_round_trip_normalises_whitespace_only(text):
    tok = TxlWordTokenizer.from_corpus(ADVERSARIAL)
    decoded = tok.decode(tok.encode(text))
    lines = text.replace(" <eos> ", "\n").split("\n")  # a literal <eos> word is a line break too
    assert decoded == "\n".join(_rust_words_joined(line) for line in lines)
    assert tok.unk_token_id not in tok.encode(text) or "<unk>" in text


def _rust_words_joined(line: str) -> str:
    from hf_txl.tokenization_txl import _split_words

    return " ".join(_split_words(line))


def test_word_splitting_matches_the_rust_whitespace_exactly():
    # Python's str.split() also splits at \x1c-\x1f; tokenizers' WhitespaceSplit does not.
    text = "a\x1cb c\x85d\xa0e\u2028f\u200bg\ufeffh\u3000i\x0bj\x1fk"
    tok = TxlWordTokenizer.from_corpus([text])
    assert tok.convert_ids_to_tokens(tok.encode(text)) == ["a\x1cb", "c", "d", "e", "f\u200bg\ufeffh", "i", "j\x1fk"]
    assert tok.unk_token_id not in tok.encode(text)


def test_min_frequency_and_max_vocab_size():
    corpus = ["b b b a a c c d e\n"]
    assert TxlWordTokenizer.from_corpus(corpus, min_frequency=2).convert_ids_to_tokens([3, 4, 5]) == ["b", "a", "c"]
    assert len(TxlWordTokenizer.from_corpus(corpus, min_frequency=2)) == 6
    capped = TxlWordTokenizer.from_corpus(corpus, max_vocab_size=5)  # 3 specials + the 2 most frequent
    assert capped.convert_ids_to_tokens(list(range(5))) == ["<unk>", "<pad>", "<eos>", "b", "a"]
    assert capped.convert_ids_to_tokens(capped.encode("a c e")) == ["a", "<unk>", "<unk>"]
    assert len(TxlWordTokenizer.from_corpus(corpus, max_vocab_size=100)) == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(min_frequency=0), r"min_frequency must be an integer >= 1, got 0; 1 keeps every word"),
        (dict(min_frequency=1.5), r"min_frequency must be an integer >= 1"),
        (dict(max_vocab_size=3), r"max_vocab_size must be an integer > 3 .*got 3; raise it or pass None"),
        (dict(min_frequency=99), r"min_frequency=99 leaves no word .*occurs 3 times\); lower min_frequency"),
    ],
)
def test_bad_word_limits_name_the_problem_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TxlWordTokenizer.from_corpus(["b b b a\n"], **kwargs)


def test_bad_word_corpora():
    for empty in ([], [""], [" \n\t", "\n"]):
        with pytest.raises(ValueError, match="empty corpus"):
            TxlWordTokenizer.from_corpus(empty)
    with pytest.raises(TypeError):
        TxlWordTokenizer.from_corpus([b"bytes"])
    assert len(TxlWordTokenizer.from_corpus("one string is one text")) == 3 + 4


def test_build_tokenizer_kinds_and_errors(shakespeare):
    assert build_tokenizer("char", [shakespeare]).get_vocab() == TxlCharTokenizer.from_corpus([shakespeare]).get_vocab()
    assert len(build_tokenizer("byte", iter(()))) == 259  # the corpus is not read
    word = build_tokenizer("word", [shakespeare], min_frequency=2, max_vocab_size=5000)
    assert isinstance(word, TxlWordTokenizer) and len(word) == 5000
    built = [build_tokenizer(k, ["ab c"]) for k in TOKENIZER_KINDS]
    assert [token_unit(t) for t in built] == list(TOKENIZER_KINDS)
    # every kind has an end-of-text token; word models do not stop generating at it (a line end)
    eos = [(t.convert_ids_to_tokens(t.eos_token_id), generation_eos_token_id(t)) for t in built]
    assert eos == [("<eos>", 2), ("<eos>", 258), ("<eos>", None)]
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'words'; choose one of \['char', 'byte', 'word'\]"):
        build_tokenizer("words", ["a"])
    with pytest.raises(ValueError, match=r"apply to word vocabularies only .*use kind='word'"):
        build_tokenizer("char", ["a"], min_frequency=2)
    with pytest.raises(ValueError, match="max_vocab_size must be"):
        build_tokenizer("word", ["a"], max_vocab_size=0)
    for kind in ("char", "word"):
        with pytest.raises(ValueError, match="empty corpus"):
            build_tokenizer(kind, [])


def test_token_unit_of_saved_and_old_tokenizers(tmp_path, word_tok):
    from transformers import AutoTokenizer

    tokenizers = {"char": TxlCharTokenizer.from_corpus(["ab"]), "byte": TxlCharTokenizer.byte_level(), "word": word_tok}
    for unit, tok in tokenizers.items():
        assert token_unit(tok) == unit
        tok.save_pretrained(tmp_path / unit)
        assert json.loads((tmp_path / unit / "tokenizer_config.json").read_text())["token_unit"] == unit
        assert token_unit(AutoTokenizer.from_pretrained(tmp_path / unit)) == unit
        # a directory saved before token_unit was recorded: recognised from the backend model
        config = json.loads((tmp_path / unit / "tokenizer_config.json").read_text())
        del config["token_unit"]
        (tmp_path / unit / "tokenizer_config.json").write_text(json.dumps(config))
        assert token_unit(AutoTokenizer.from_pretrained(tmp_path / unit)) == unit
    assert token_unit(object()) == "token"


def test_fast_word_encoder_agrees_with_the_tokenizers_pipeline(tmp_path, shakespeare):
    from transformers import AutoTokenizer

    tok = TxlWordTokenizer.from_corpus([shakespeare[:50000], *ADVERSARIAL], min_frequency=2)
    tok.save_pretrained(tmp_path)
    texts = [shakespeare[50000:60000], *ADVERSARIAL, "x<unk>y <pad> <eos>\n\x1c\x1f\x85 a\u2028b"]
    for loaded in (tok, AutoTokenizer.from_pretrained(tmp_path)):
        encode = fast_word_encoder(loaded)
        assert encode is not None
        for text in texts:
            assert encode(text) == loaded(text, add_special_tokens=False)["input_ids"]
    assert fast_word_encoder(TxlCharTokenizer.from_corpus(["ab"])) is None
    assert fast_word_encoder(TxlWordTokenizer.from_corpus(["ab"], split_special_tokens=False)) is None


def test_word_corpus_through_tokenize_to_array(shakespeare):
    from datasets import Dataset

    from hf_txl.training.data import tokenize_to_array

    text = shakespeare[: shakespeare.index("\n", 120000) + 1]  # several pieces: the whole-text row is cut at line ends
    tok = TxlWordTokenizer.from_corpus([text[:60000]])  # the rest has unknown words: no warning for them
    lines = text.split("\n")[:-1]
    by_line = [line + "\n" for line in lines]
    expected = tok(text, add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownCharacterWarning)
        whole = tokenize_to_array(Dataset.from_dict({"text": [text]}), tok)
        per_line = tokenize_to_array(Dataset.from_dict({"text": by_line}), tok)
        stripped = tokenize_to_array(Dataset.from_dict({"text": lines}), tok)  # rows without their newline
    assert whole.tolist() == per_line.tolist() == stripped.tolist() == expected
    assert int((whole == tok.line_end_token_id).sum()) == len(lines) == text.count("\n")
    assert tok.unk_token_id in expected
    # WikiText-103 rows: "" for a blank line still gives its <eos>; a last line without "\n" gets one too
    rows = tokenize_to_array(Dataset.from_dict({"text": [" the the \n", "", "the zebra"]}), tok)
    assert tok.decode(rows.tolist()) == "the the\n\nthe <unk>\n"


def test_word_save_and_reload(tmp_path, word_tok):
    word_tok.save_pretrained(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if not f.endswith(".json")) == []
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend" and config["token_unit"] == "word"
    reloaded = TxlWordTokenizer.from_pretrained(tmp_path)
    sample = "the cat sat on a zebra\n\nthe end\n"
    assert reloaded.encode(sample) == word_tok.encode(sample)
    assert reloaded.decode(reloaded.encode(sample)) == sample.replace("zebra", "<unk>")
    assert reloaded.get_vocab() == word_tok.get_vocab() and len(reloaded) == len(word_tok)
    assert (reloaded.unk_token_id, reloaded.pad_token_id, reloaded.eos_token_id, reloaded.line_end_token_id) == (
        0, 1, 2, 2,
    )  # fmt: skip
