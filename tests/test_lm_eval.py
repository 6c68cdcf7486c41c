"""lm-evaluation-harness on an exported character model, with its defaults: a local ``loglikelihood_rolling`` task
runs (the tokenizer's eos is the prefix token of every scored text), and its bits per byte are hf_txl's own figure
for the same texts, computed with the memory by ``evaluate_stream``."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_txl.training.data import DEFAULT_CORPUS_PATH

ROOT = Path(__file__).resolve().parents[1]
TASK = """\
task: txl_validation
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: loglikelihood_rolling
validation_split: validation
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Offline, with the datasets and remote-code caches of this test, on one thread (measured on a busy 2-core
    machine: the tiny model trains in half the time of two threads)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = "1"
    env.update(HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny character model trained by scripts/train.py (100 steps of 16 x 32 characters; the default tokenizer,
    with its eos), and three validation documents: the first passages of Tiny Shakespeare after its training text
    that have 150 characters or more (218, 171 and 259)."""
    tmp_path = tmp_path_factory.mktemp("lm_eval")
    text = Path(DEFAULT_CORPUS_PATH).read_text()
    (tmp_path / "train.txt").write_text(text[:100_000])
    passages = text[100_000:104_000].split("\n\n")
    documents = [p + "\n" for p in passages if len(p) >= 150][:3]
    (tmp_path / "validation.txt").write_text("\n".join(documents))
    out = tmp_path / "run"
    run([
        sys.executable, "scripts/train.py", "--preset", "tiny", "--max_train_steps", "100", "--learning_rate", "2e-2",
        "--per_device_train_batch_size", "16", "--train_file", str(tmp_path / "train.txt"),
        "--validation_file", str(tmp_path / "validation.txt"),
        "--output_dir", str(out),
    ], tmp_path)  # fmt: skip
    return out, documents


def hf_txl_nll(model_dir: Path, documents: list[str]) -> float:
    """hf_txl's summed loss (nats) over ``documents``, each scored on its own after the eos, in order with a memory
    that holds the whole document (``evaluate_stream``, the training script's segments of 32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_txl.training.evaluation import evaluate_stream

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total = 0.0
    for document in documents:
        ids = torch.tensor([tokenizer.eos_token_id, *tokenizer.encode(document)])
        metrics = evaluate_stream(model, ids, batch_size=1, tgt_len=32, mem_len=len(ids))
        assert metrics["tokens"] == len(document)  # every character scored once (the eos only as context)
        total += metrics["loss"] * metrics["tokens"]
    return total


@pytest.mark.slow
def test_lm_eval_rolling_loglikelihood_runs_with_defaults_and_matches_evaluate_stream(trained, tmp_path):
    """lm-eval scores each document as one window (shorter than its default max length, 2048) after the prefix
    token, which is the tokenizer's eos (there is no bos), without memory. hf_txl scores the same tokens after the
    same eos in segments of 32 with a memory that keeps the whole document: the segment recurrence then computes
    the same attention as the single window (the same keys, the same relative distances; clamp_len -1,
    same_length off), so both sum the same log-probabilities and differ only by float32 rounding. Measured: 3.7185
    bits per byte both, a relative difference of 6e-9. The tolerance, 1e-5 relative, leaves room for rounding and
    is far below a real discrepancy: another prefix token moves the figure by 3e-4 (<pad>) to 3e-2 (a newline),
    scoring in segments of 32 without the memory by 6e-3."""
    model_dir, documents = trained
    config = json.loads((model_dir / "config.json").read_text())
    assert config["eos_token_id"] == 2  # the character vocabulary's <eos>: where generation stops
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "txl_validation.yaml").write_text(TASK.format(data=data))
    model_args = f"pretrained={model_dir},trust_remote_code=True"  # no prefix_token_id: the defaults
    run([
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
        "--tasks", "txl_validation", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
        "--output_path", str(tmp_path / "results"),
    ], tmp_path)  # fmt: skip
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    figures = json.loads(results_file.read_text())["results"]["txl_validation"]

    nll = hf_txl_nll(model_dir, documents)
    num_bytes = sum(len(d.encode("utf-8")) for d in documents)
    num_words = sum(len(re.split(r"\s+", d)) for d in documents)  # lm-eval's count (a trailing newline adds one)
    expected_bits = nll / num_bytes / math.log(2)
    assert figures["bits_per_byte,none"] == pytest.approx(expected_bits, rel=1e-5)
    assert figures["byte_perplexity,none"] == pytest.approx(2**expected_bits, rel=1e-5)
    assert figures["word_perplexity,none"] == pytest.approx(math.exp(nll / num_words), rel=1e-5)
    assert expected_bits < 4.0  # trained: below the training text's character frequencies alone (4.75 bits)
