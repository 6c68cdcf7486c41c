"""A word-level Tiny Shakespeare with adaptive input and softmax, end to end through the command line: it trains,
exports, loads with the Auto classes, generates words, and evaluates with perplexity per word as the headline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = "n_layer=2,d_model=64,n_head=2,d_head=32,d_inner=128,cutoffs=[2000,6000],div_val=2,dropout=0.0"


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def word_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("word") / "run"
    result = run([
        sys.executable, "scripts/train.py", "--preset", "shakespeare_word", "--config_overrides", SMALL,
        "--max_train_steps", "60", "--num_warmup_steps", "5", "--learning_rate", "3e-3", "--logging_steps", "5",
        "--output_dir", str(out),
    ])  # fmt: skip
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_word_model_trains_with_adaptive_softmax_and_reports_perplexity(word_run):
    out, log = word_run
    config = json.loads((out / "config.json").read_text())
    assert config["cutoffs"] == [2000, 6000] and config["div_val"] == 2
    assert config["eos_token_id"] is None  # the tokenizer's eos is the line end: generation goes on across lines
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < train[0] - 1.0, train  # from ~ln(vocab) down
    results = json.loads((out / "eval_results.json").read_text())
    assert results["perplexity"] < config["vocab_size"] / 4
    assert f"perplexity {results['perplexity']:.2f} per word" in log


@pytest.mark.slow
def test_word_model_loads_generates_words_and_evaluates(word_run, tmp_path):
    out, _ = word_run
    script = f"""
import importlib.util
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
prompt = tokenizer("ROMEO:\\nWhat is", return_tensors="pt")
assert tokenizer.unk_token_id not in prompt["input_ids"][0].tolist()
ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)
assert importlib.util.find_spec("hf_txl") is not None  # importable (found, not imported), yet:
imported = sorted(name for name in sys.modules if name.split(".")[0] == "hf_txl")
print("RESULT", type(model).__name__, ids.shape[1] - prompt["input_ids"].shape[1], imported)
print(tokenizer.decode(ids[0]))
"""
    # hf_txl is importable here (installed in this interpreter) but not imported: the shipped code files and
    # tokenizer.json suffice. The script lists every hf_txl module in sys.modules after loading and generating.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**ENV, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=outside, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, text = result.stdout[result.stdout.index("RESULT ") :].split("\n", 1)
    assert first == "RESULT TxlForCausalLM 12 []"
    assert text.startswith("ROMEO:\nWhat is")

    evaluated = run([sys.executable, "scripts/evaluate.py", str(out), "--max_eval_steps", "5"])
    assert "perplexity" in evaluated.stdout.lower()
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["token_unit"] == "word"
