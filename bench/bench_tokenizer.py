"""Benchmark TxlCharTokenizer on the bundled Tiny Shakespeare corpus (1,115,394 characters).

Measures (best of ``--repeat`` runs, wall clock, after one warm-up):
  * batch encode of the whole corpus through ``tokenizer(list_of_texts)`` (the transformers ``__call__``,
    Rust encoder + conversion to Python lists), with the corpus cut into 256 equal pieces and, separately,
    into its ~40k lines;
  * ``decode`` of the whole id sequence;
  * ``tokenize_to_array`` (the data pipeline: ``Dataset.map`` + flat numpy array) on the whole corpus;
  * the same batch encode with the byte-level vocabulary.
Every encode is checked for an exact round trip. Run: ``.venv/bin/python bench/bench_tokenizer.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

from hf_txl import DEFAULT_CORPUS_PATH, TxlCharTokenizer  # noqa: E402
from hf_txl.training.data import tokenize_to_array  # noqa: E402


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Run ``fn`` once to warm up, then ``repeat`` times; return the best wall time and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    datasets.disable_progress_bars()

    with open(DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        text = f.read()
    n = len(text)
    pieces = [text[i * n // 256 : (i + 1) * n // 256] for i in range(256)]
    lines = text.splitlines(keepends=True)
    char_tok = TxlCharTokenizer.from_corpus([text])
    byte_tok = TxlCharTokenizer.byte_level()
    dataset = datasets.Dataset.from_dict({"text": [text]})

    def encode(tok: TxlCharTokenizer, texts: list[str]) -> Callable[[], list[list[int]]]:
        return lambda: tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    rows = []
    for name, tok, texts in (
        ("char: tokenizer(256 pieces)", char_tok, pieces),
        (f"char: tokenizer({len(lines)} lines)", char_tok, lines),
        ("byte: tokenizer(256 pieces)", byte_tok, pieces),
    ):
        seconds, ids = best_of(encode(tok, texts), args.repeat)
        assert tok.decode([i for row in ids for i in row]) == text, name
        rows.append((name, seconds))
    flat = [i for row in encode(char_tok, pieces)() for i in row]
    seconds, decoded = best_of(lambda: char_tok.decode(flat), args.repeat)
    assert decoded == text
    rows.append(("char: decode(all ids)", seconds))
    seconds, array = best_of(lambda: tokenize_to_array(dataset, char_tok), args.repeat)
    assert len(array) == n
    rows.append(("char: tokenize_to_array (Dataset.map)", seconds))

    print(f"corpus: {DEFAULT_CORPUS_PATH} ({n:,} chars), best of {args.repeat}, {os.cpu_count()} CPUs")
    print(f"{'operation':<40} {'seconds':>8} {'M chars/s':>10}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>8.3f} {n / seconds / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
