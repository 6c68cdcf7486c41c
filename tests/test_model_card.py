"""The model card: YAML metadata with model-index from the run's own numbers, the template's sections, and the
matplotlib loss-curve PNG (labelled axes, legend, the log's values)."""

import json

import numpy as np
import pytest
from conftest import tiny_config
from huggingface_hub import ModelCard
from matplotlib.image import imread
from test_evaluate import make_model_dir

from hf_txl import TxlForCausalLM, TxlWordTokenizer
from hf_txl.training.model_card import (
    collect_facts,
    loss_curve_figure,
    loss_curve_points,
    write_loss_curve_png,
    write_model_card,
)

EVAL = {"step": 30, "eval_mem_len": 48, "eval_tgt_len": 16, "loss": 2.3456789, "bpc": 3.3841, "perplexity": 10.44,
        "tokens": 12345, "seconds": 1.5, "tokens_per_s": 8230.0}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    make_model_dir(tmp_path, "ROMEO: to be or not to be\n")
    args = {"preset": "tiny", "max_train_steps": 30, "per_device_train_batch_size": 4, "tgt_len": 16, "mem_len": 16,
            "learning_rate": 0.003, "command": "accelerate launch scripts/train.py --preset tiny --max_train_steps 30",
            "hf_txl_version": "0.1.0", "tokenizer": "char", "validation_split_fraction": 0.1}  # fmt: skip
    (tmp_path / "training_args.json").write_text(json.dumps(args))
    (tmp_path / "eval_results.json").write_text(json.dumps(EVAL))
    log = [{"step": s, "loss": 4.0 - 0.05 * s} for s in range(1, 31)] + [{"step": 30, "final": True, "eval_loss": 2.35}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return tmp_path


WORD_EVAL = {"step": 30, "eval_mem_len": 32, "eval_tgt_len": 16, "loss": 4.123456, "bpc": 5.9488,
             "perplexity": 61.7412, "tokens": 4321, "seconds": 1.5, "tokens_per_s": 2880.0}  # fmt: skip
WORDS = " ".join(f"w{i}" for i in range(24))


@pytest.fixture
def word_run_dir(tmp_path):
    """A word-level export with an adaptive input and softmax (cutoffs), as `--tokenizer word` writes it."""
    tmp_path = tmp_path / "txl-word"
    tokenizer = TxlWordTokenizer.from_corpus([f"{WORDS}\nthe the the of of\n"], min_frequency=1, max_vocab_size=30)
    config = tiny_config(vocab_size=len(tokenizer), mem_len=16, pad_token_id=tokenizer.pad_token_id, cutoffs=[8, 16],
                         div_val=2)  # fmt: skip
    TxlForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = {"preset": "shakespeare_word", "max_train_steps": 30, "per_device_train_batch_size": 4, "tgt_len": 16,
            "mem_len": 16, "learning_rate": 0.001, "command": "accelerate launch scripts/train.py --tokenizer word",
            "hf_txl_version": "0.1.0", "tokenizer": "word", "min_frequency": 2, "max_vocab_size": 30,
            "validation_split_fraction": 0.1}  # fmt: skip
    (tmp_path / "training_args.json").write_text(json.dumps(args))
    (tmp_path / "eval_results.json").write_text(json.dumps(WORD_EVAL))
    log = [{"step": s, "loss": 6.0 - 0.05 * s} for s in range(1, 31)] + [{"step": 30, "final": True, "eval_loss": 4.1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return tmp_path


def test_card_metadata_and_sections_come_from_the_run_files(run_dir):
    readme = write_model_card(run_dir, repo_id="someone/txl-tiny")
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and "hf_txl" in data["tags"]
    assert data["datasets"] == ["karpathy/tiny_shakespeare"]
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"bpc": 3.3841, "perplexity": 10.44, "loss": 2.3457}
    text = card.text
    assert "accelerate launch scripts/train.py --preset tiny --max_train_steps 30" in text
    assert "| 16 | 48 | 2.3457 | 3.3841 | 10.440 | 12,345 | 8,230 |" in text
    assert "![Training loss](loss_curve.png)" in text and (run_dir / "loss_curve.png").is_file()
    assert "from step 1 to 30" in text and "3.950 to 2.500" in text
    assert 'from_pretrained("someone/txl-tiny")' in text and "trust_remote_code=True" in text
    assert "## Limitations" in text and '"d_model": 32' in text


def test_evaluation_rows_are_added_to_the_card_and_the_model_index(run_dir):
    rows = [{"tgt_len": 16, "mem_len": m, "clamp_len": -1, "same_length": False, "loss": 2.0 - m / 1000,
             "bpc": (2.0 - m / 1000) / 0.6931471805599453, "perplexity": 7.0, "tokens": 999, "tokens_per_s": 50.0}
            for m in (0, 64, 512)]  # fmt: skip
    report = {"rows": rows, "data": "x.txt", "split": "validation", "batch_size": 2, "device": "cpu",
              "command": "python scripts/evaluate.py run --mem_len 0 64 512"}  # fmt: skip
    (run_dir / "evaluation.json").write_text(json.dumps(report))
    card = ModelCard.load(write_model_card(run_dir))
    assert "python scripts/evaluate.py run --mem_len 0 64 512" in card.text
    assert "| 16 | 512 | -1 | False | 1.4880 |" in card.text
    names = [r.metric_name for r in card.data.eval_results]
    assert sum("mem_len=512, clamp_len=-1" in n for n in names) == 1
    assert 'from_pretrained("path/to/model_dir")' in card.text  # no repo id known


def test_card_leaves_the_picture_out_when_the_log_has_no_training_loss(run_dir):
    (run_dir / "log.jsonl").write_text(json.dumps({"step": 30, "final": True, "eval_loss": 2.35}) + "\n")
    text = ModelCard.load(write_model_card(run_dir)).text
    assert not (run_dir / "loss_curve.png").exists()
    assert "loss_curve.png" not in text and "Training loss" not in text


def test_card_picture_is_a_readable_png_titled_with_the_model(run_dir):
    write_model_card(run_dir, repo_id="someone/txl-tiny")
    image = imread(run_dir / "loss_curve.png")
    assert image.shape[:2] == (450, 800)
    rgb = image[..., :3]
    assert rgb.std() > 0.05 and (rgb < 0.5).mean() > 0.005  # not blank: a curve, text and axes are drawn
    blue = (np.abs(rgb - np.array([31, 119, 180]) / 255).max(axis=-1) < 0.08).sum()
    orange = (np.abs(rgb - np.array([255, 127, 14]) / 255).max(axis=-1) < 0.08).sum()
    assert blue > 200 and orange > 20  # the training line and the validation square (plus their legend keys)


def test_loss_curve_figure_has_labels_legend_and_the_log_values(run_dir):
    curve = loss_curve_points(run_dir / "log.jsonl")
    fig = loss_curve_figure(curve["train"], curve["eval"], title="txl-tiny")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss (nats per token)"
    assert ax.get_title() == "txl-tiny"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "validation loss"]
    assert ax.xaxis.get_gridlines()[0].get_visible() and ax.yaxis.get_gridlines()[0].get_visible()
    train, evals = ax.get_lines()
    assert list(train.get_xdata()) == list(range(1, 31))
    assert np.allclose(train.get_ydata(), [4.0 - 0.05 * s for s in range(1, 31)])
    assert list(evals.get_xdata()) == [30] and list(evals.get_ydata()) == [2.35]
    assert evals.get_linestyle() == "None" and evals.get_marker() == "s"
    assert tuple(fig.get_size_inches() * fig.dpi) == (800, 450)


def test_loss_curve_with_one_point_and_no_evaluations(tmp_path):
    fig = loss_curve_figure([(7, 3.25)])
    (ax,) = fig.axes
    (line,) = ax.get_lines()  # no validation series
    assert line.get_marker() == "o"  # a lone point would be invisible as a line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss"]
    assert ax.get_xlim() == (6, 8)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["6", "7", "8"]  # whole steps, not 6.88
    path = tmp_path / "one.png"
    write_loss_curve_png(path, [(7, 3.25)], width=400, height=300)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[:2] == (300, 400)
    with pytest.raises(ValueError, match="no training-loss points"):
        write_loss_curve_png(path, [])


def test_log_points_keep_the_last_record_per_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 2.5}\n'
                   '{"step": 2, "eval_loss": 2.2}\n')  # fmt: skip
    assert loss_curve_points(log) == {"train": [(1, 3.0), (2, 2.5)], "eval": [(2, 2.2)]}


def test_character_card_names_characters_and_leads_with_bits_per_character(run_dir):
    text = ModelCard.load(write_model_card(run_dir)).text
    assert "A character-level **Transformer-XL**" in text
    assert "| loss (nats/char) | bits per character | perplexity | characters | characters/s |" in text
    assert "any other character in a prompt is mapped to" in text
    assert "word-level" not in text and "adaptive input" not in text and "perplexity per" not in text.lower()
    assert collect_facts(run_dir)["tokenizer_kind"] == "character"


def test_word_card_leads_with_perplexity_per_word(word_run_dir):
    readme = write_model_card(word_run_dir, repo_id="someone/txl-word")
    card = ModelCard.load(readme)
    text, data = card.text, card.data.to_dict()
    assert "word-level" in data["tags"] and "character-level" not in data["tags"]
    assert "A word-level **Transformer-XL**" in text and "**perplexity per word**" in text
    assert "| tgt_len | mem_len | **perplexity (per word)** | loss (nats/word) | words | words/s |" in text
    assert "| 16 | 32 | **61.74** | 4.1235 | 4,321 | 2,880 |" in text
    assert "bits per character" not in text.lower() and "character-level" not in text and "nats/char" not in text
    assert "any other character" not in text and "16 words with a memory of 16" in text
    assert "each line's `<eos>`" in text
    # the architecture table shows the adaptive input and softmax, from config.json
    assert "| adaptive input and softmax: cutoffs / div_val / d_embed | 8, 16 / 2 / 32 |" in text
    # the vocabulary limitation names the word rules from training_args.json
    assert "seen fewer than 2 times in the training text or beyond the 30 most frequent tokens" in text
    assert "map to `<unk>`" in text
    # model-index: perplexity first, no bits-per-character claim
    results = card.data.eval_results
    assert [r.metric_type for r in results] == ["perplexity", "loss"]
    assert results[0].metric_value == 61.7412 and results[0].metric_name.startswith("Perplexity per word")
    assert not any("character" in r.metric_name.lower() for r in results)


def test_word_card_loss_curve_title_and_evaluation_rows(word_run_dir, monkeypatch):
    import hf_txl.training.model_card as model_card

    titles = []
    draw = model_card.write_loss_curve_png
    monkeypatch.setattr(model_card, "write_loss_curve_png", lambda *a, title=None, **k: (titles.append(title),
                        draw(*a, title=title, **k)))  # fmt: skip
    rows = [{"tgt_len": 16, "mem_len": m, "clamp_len": -1, "same_length": True, "loss": 4.0, "bpc": 5.77,
             "perplexity": 54.598 - m / 100, "tokens": 999, "tokens_per_s": 50.0} for m in (0, 64)]  # fmt: skip
    report = {"rows": rows, "data": "x.txt", "split": "validation", "batch_size": 2, "device": "cpu",
              "token_unit": "word", "command": "python scripts/evaluate.py run --mem_len 0 64"}  # fmt: skip
    (word_run_dir / "evaluation.json").write_text(json.dumps(report))
    card = ModelCard.load(write_model_card(word_run_dir, repo_id="someone/txl-word"))
    assert titles == ["txl-word (word-level): loss during training"]
    assert "| 16 | 64 | -1 | True | **53.96** | 4.0000 | 999 | 50 |" in card.text
    row_results = [r for r in card.data.eval_results if "clamp_len" in r.metric_name]
    assert [(r.metric_type, r.metric_value) for r in row_results] == [("perplexity", 54.598), ("perplexity", 53.958)]


def test_token_unit_falls_back_to_the_saved_tokenizer_then_char(word_run_dir, run_dir):
    (word_run_dir / "training_args.json").unlink()
    assert collect_facts(word_run_dir)["unit"]["code"] == "word"  # tokenizer_config.json's token_unit
    (run_dir / "training_args.json").write_text("{}")
    (run_dir / "tokenizer_config.json").unlink()
    assert collect_facts(run_dir)["tokenizer_kind"] == "character"


def test_byte_card_names_bytes_and_leads_with_bits_per_byte(run_dir):
    args = json.loads((run_dir / "training_args.json").read_text())
    (run_dir / "training_args.json").write_text(json.dumps({**args, "tokenizer": "byte"}))
    card = ModelCard.load(write_model_card(run_dir))
    assert "byte-level" in card.data.to_dict()["tags"] and "A byte-level **Transformer-XL**" in card.text
    assert "| loss (nats/byte) | bits per byte | perplexity | bytes | bytes/s |" in card.text
    assert "x 16 bytes with a memory" in card.text and "the 256 byte values" in card.text
    assert "bits per character" not in card.text and "any other character" not in card.text
    assert card.data.eval_results[0].metric_name.startswith("Bits per byte")


def test_word_card_without_vocabulary_limits(word_run_dir):
    args = json.loads((word_run_dir / "training_args.json").read_text())
    (word_run_dir / "training_args.json").write_text(json.dumps({**args, "min_frequency": 1, "max_vocab_size": None}))
    text = ModelCard.load(write_model_card(word_run_dir)).text
    assert "Word vocabulary: every word in the training text." in text
    assert "any word of a prompt that is not in the training text maps to `<unk>`" in text
    assert "seen fewer than" not in text and "most frequent" not in text
