"""The txl_lm evaluate metric, evaluate_stream's figures, scripts/evaluate.py (several memory lengths, bad input)."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from hf_txl import TxlCharTokenizer, TxlForCausalLM, TxlWordTokenizer
from hf_txl.training import METRIC_PATH, evaluate_stream, lm_metrics, load_metric
from hf_txl.training.data import DEFAULT_CORPUS_PATH

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    """A scripts/ file as a module (scripts/evaluate.py must not be imported as `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"txl_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model_dir(path, corpus_text):
    """An untrained tiny model + its char tokenizer, saved like an export (no training files)."""
    tokenizer = TxlCharTokenizer.from_corpus([corpus_text])
    model = TxlForCausalLM(tiny_config(vocab_size=len(tokenizer), mem_len=16, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(Path(DEFAULT_CORPUS_PATH).read_text()[:2000])
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_file):
    path = tmp_path_factory.mktemp("model")
    make_model_dir(path, text_file.read_text())
    return path


# --- the metric ------------------------------------------------------------------------------------------


def test_metric_loads_offline_from_its_path_in_a_clean_process(tmp_path):
    script = (
        "import evaluate, json, sys\n"
        "m = evaluate.load(sys.argv[1])\n"
        "m.add_batch(losses=[2.1, 1.7])\n"
        "m.add_batch(losses=[0.4])\n"
        "print(json.dumps(m.compute()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "home")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, METRIC_PATH], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["num_tokens"] == 3
    assert figures["loss"] == pytest.approx(1.4)
    assert figures["bpc"] == pytest.approx(1.4 / math.log(2))
    assert figures["perplexity"] == pytest.approx(math.exp(1.4))


def test_sums_with_token_counts_equal_per_token_losses_and_lm_metrics_uses_the_metric():
    rng = np.random.default_rng(0)
    losses = rng.uniform(0, 5, 1000)
    metric = load_metric()
    per_token = metric.compute(losses=losses.tolist())
    metric.add_batch(losses=[losses[:300].sum(), losses[300:].sum()], num_tokens=[300, 700])
    summed = metric.compute()
    for key in ("loss", "bpc", "perplexity", "num_tokens"):
        assert summed[key] == pytest.approx(per_token[key], rel=1e-12)
    assert lm_metrics(losses.sum(), 1000) == {k: pytest.approx(per_token[k]) for k in ("loss", "bpc", "perplexity")}
    with pytest.raises(ValueError, match="no scored tokens"):
        lm_metrics(0.0, 0)
    assert math.isfinite(lm_metrics(1e6, 1)["perplexity"])  # capped, not an overflow


def test_evaluate_stream_scores_every_token_once_in_order_with_memory():
    model = TxlForCausalLM(tiny_config(mem_len=8)).eval()
    tokens = np.random.default_rng(1).integers(1, 40, 2 * 24 + 1)
    metrics = evaluate_stream(model, tokens, batch_size=2, tgt_len=6, mem_len=8)
    rows = torch.from_numpy(tokens[:48].reshape(2, 24).astype(np.int64))
    labels = torch.from_numpy(np.stack([tokens[1:25], tokens[25:49]]).astype(np.int64))
    nll, mems = 0.0, None
    with torch.no_grad():
        for start in range(0, 24, 6):
            out = model(input_ids=rows[:, start : start + 6], mems=mems)
            mems = out.mems
            nll += F.cross_entropy(out.logits.flatten(0, 1), labels[:, start : start + 6].flatten(), reduction="sum")
    assert metrics["tokens"] == 48
    assert metrics["loss"] == pytest.approx(nll.item() / 48, rel=1e-5)
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2))
    assert metrics["tokens_per_s"] > 0


# --- scripts/evaluate.py ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_rows_per_memory_length_json_table_and_card(model_dir, text_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(model_dir), "--validation_file",
               str(text_file), "--tgt_len", "16", "--batch_size", "4", "--mem_len", "0", "16", "64",
               "--update_card"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((model_dir / "evaluation.json").read_text())
    rows = report["rows"]
    assert [r["mem_len"] for r in rows] == [0, 16, 64]
    assert all(r["tgt_len"] == 16 and r["tokens"] == 4 * ((2000 - 1) // 4) for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["bpc"] == pytest.approx(r["loss"] / math.log(2)) for r in rows)
    assert rows[0]["loss"] != rows[2]["loss"]  # the memory length is really applied
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and f"{rows[1]['bpc']:.4f}" in table[3]

    model = TxlForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = TxlCharTokenizer.from_pretrained(model_dir)
    ids = np.array(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    again = evaluate_stream(model, ids, batch_size=4, tgt_len=16, mem_len=64)
    assert rows[2]["loss"] == pytest.approx(again["loss"], rel=1e-6)
    assert model.config.mem_len == 16  # evaluation settings never leak into the model

    card = (model_dir / "README.md").read_text()
    assert "model-index" in card and f"{rows[2]['bpc']:.4f}" in card


def test_documents_of_a_dataset_end_with_eos_as_in_training(tmp_path, model_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = ["First Citizen:\nBefore we proceed", "", "All:\nSpeak, speak."]
    for split in ("train", "validation"):
        datasets.Dataset.from_dict({"text": rows}).to_json(tmp_path / "documents" / f"{split}.jsonl")
    data = dict(dataset_name=str(tmp_path / "documents"), dataset_config_name=None, train_file=None,
                validation_file=None, text_column="text", validation_fraction=0.1)  # fmt: skip
    tokenizer = TxlCharTokenizer.from_pretrained(model_dir)
    ids = load_script("evaluate").split_tokens(argparse.Namespace(split="validation"), tokenizer, data)
    assert ids.tolist() == [i for row in rows for i in [*tokenizer.encode(row), tokenizer.eos_token_id]]


def test_dtype_and_quantize_flags_evaluate_in_that_precision(tmp_path, model_dir, text_file, monkeypatch):
    script = load_script("evaluate")
    models, real = [], script.load_model_and_tokenizer
    monkeypatch.setattr(script, "load_model_and_tokenizer", lambda *a, **k: models.append(real(*a, **k)) or models[-1])
    common = [str(model_dir), "--validation_file", str(text_file), "--tgt_len", "16", "--batch_size", "4",
              "--mem_len", "16", "--max_eval_steps", "5"]  # fmt: skip
    fp32 = script.main([*common, "--output_file", str(tmp_path / "fp32.json")])[0]
    bf16 = script.main([*common, "--dtype", "bfloat16", "--output_file", str(tmp_path / "bf16.json")])[0]
    assert models[-1][0].dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16.json").read_text())["dtype"] == "bfloat16"
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.01) and bf16["loss"] != fp32["loss"]
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (hf_txl[quantization])")
    int8 = script.main([*common, "--quantize", "int8", "--output_file", str(tmp_path / "int8.json")])[0]
    assert type(models[-1][0].transformer.layers[0].attn.qkv_proj.weight).__name__ == "Int8Tensor"
    assert json.loads((tmp_path / "int8.json").read_text())["quantize"] == "int8"
    assert int8["loss"] == pytest.approx(fp32["loss"], rel=0.01) and int8["loss"] != fp32["loss"]


def test_bad_model_directories_name_the_problem_and_the_fix(tmp_path, model_dir):
    script = load_script("evaluate")
    with pytest.raises(SystemExit, match="no config.json"):
        script.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        script.main([str(tmp_path / "missing")])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(SystemExit, match="tokenizer is missing.*tokenizer.save_pretrained"):
        script.main([str(no_tokenizer)])
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set"):
        script.main(["nobody-xyz/not-a-model"])
    with pytest.raises(SystemExit, match="--mem_len must be >= 0"):
        script.main([str(model_dir), "--mem_len", "-1"])


def test_word_models_report_perplexity_per_word_as_the_headline(tmp_path, text_file, capsys):
    """A word-level model (adaptive softmax): perplexity per word leads; the unit is recorded in the JSON."""
    tokenizer = TxlWordTokenizer.from_corpus([text_file.read_text()])
    config = tiny_config(vocab_size=len(tokenizer), mem_len=16, pad_token_id=tokenizer.pad_token_id, cutoffs=[40, 120])
    TxlForCausalLM(config).save_pretrained(tmp_path / "word")
    tokenizer.save_pretrained(tmp_path / "word")
    script = load_script("evaluate")
    output = tmp_path / "word.json"
    argv = [str(tmp_path / "word"), "--validation_file", str(text_file), "--tgt_len", "16", "--batch_size", "2",
            "--mem_len", "0", "16", "--output_file", str(output)]  # fmt: skip
    rows = script.main(argv)
    captured = capsys.readouterr()
    report = json.loads(output.read_text())
    assert (report["token_unit"], report["headline_metric"]) == ("word", "perplexity")
    words = len(text_file.read_text().split()) + text_file.read_text().count("\n")  # <eos> is counted as a word
    assert all(r["tokens"] == 2 * ((words - 1) // 2) for r in rows)
    table = [line for line in captured.out.splitlines() if line.startswith("|")]
    assert "| perplexity (per word) | loss (nats/word) |" in table[0] and "bpc" not in table[0]
    assert f"| {rows[1]['perplexity']:.2f} | {rows[1]['loss']:.4f} |" in table[3]
    assert f"mem_len=16: perplexity {rows[1]['perplexity']:.2f} per word" in captured.err


def test_char_models_keep_bits_per_character_as_the_headline(tmp_path, model_dir, text_file, capsys):
    script = load_script("evaluate")
    output = tmp_path / "char.json"
    rows = script.main([str(model_dir), "--validation_file", str(text_file), "--tgt_len", "16", "--batch_size", "4",
                        "--max_eval_steps", "3", "--output_file", str(output)])  # fmt: skip
    report = json.loads(output.read_text())
    assert (report["token_unit"], report["headline_metric"]) == ("char", "bpc")
    captured = capsys.readouterr()
    assert f"bpc {rows[0]['bpc']:.4f}" in captured.err and "| bpc | perplexity |" in captured.out
    assert "bits/byte" in script.format_table(rows, "byte") and "per token" in script.format_table(rows, "token")
