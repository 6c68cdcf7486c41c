"""The model card: YAML metadata with model-index from the run's own numbers, the template's sections, and the
dependency-free loss-curve PNG."""

import json
import struct
import zlib

import pytest
from huggingface_hub import ModelCard
from test_evaluate import make_model_dir

from hf_txl.model_card import loss_curve_points, write_loss_curve_png, write_model_card

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


def test_loss_curve_is_a_valid_png(tmp_path):
    path = tmp_path / "curve.png"
    write_loss_curve_png(path, [(1, 4.0), (50, 2.0), (100, 1.5)], [(100, 1.7)], width=200, height=100)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (200, 100)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == 100 * (1 + 3 * 200)
    assert bytes((31, 119, 180)) in raw and bytes((255, 127, 14)) in raw  # the training line and the eval point
    with pytest.raises(ValueError, match="no training-loss points"):
        write_loss_curve_png(path, [])


def test_log_points_keep_the_last_record_per_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 2.5}\n'
                   '{"step": 2, "eval_loss": 2.2}\n')  # fmt: skip
    assert loss_curve_points(log) == {"train": [(1, 3.0), (2, 2.5)], "eval": [(2, 2.2)]}
