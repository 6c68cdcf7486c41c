"""TxlCharTokenizer: vocabulary order, exact round trips, unknown characters, saving and clean-env loading."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from hf_txl import DEFAULT_CORPUS_PATH, TxlCharTokenizer, UnknownCharacterWarning

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
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == ["<unk>", "<pad>"] + sorted(set("helloworld\n"))
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, None)
    assert len(tok) == tok.vocab_size == 2 + len(set("helloworld\n"))
    with_eos = TxlCharTokenizer.from_corpus(["hello"], add_eos=True)
    assert (with_eos.unk_token_id, with_eos.pad_token_id, with_eos.eos_token_id) == (0, 1, 2)
    assert len(with_eos) == with_eos.vocab_size == 3 + len(set("hello"))


def test_shakespeare_vocabulary(char_tok, shakespeare):
    assert len(set(shakespeare)) == 65
    assert len(char_tok) == 67


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
    assert len(tok) == tok.vocab_size == 258
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (256, 257, None)
    assert tok.encode("\x00\xff") == [0, 0xC3, 0xBF]
    assert TxlCharTokenizer.byte_level(add_eos=True).eos_token_id == 258


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


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_auto_tokenizer_loads_without_hf_txl(tmp_path, kind, shakespeare):
    tok = (
        TxlCharTokenizer.from_corpus([shakespeare, "<eos>\t"], add_eos=True)
        if kind == "char"
        else TxlCharTokenizer.byte_level(add_eos=True)
    )
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
    assert result["decoded"] == text
    assert result["special_ids"] == [tok.unk_token_id, tok.pad_token_id, tok.eos_token_id]
    assert result["len"] == len(tok)
    assert result["padding_side"] == "left"
