"""Benchmark the data pipeline on a generated enwik8-sized corpus (100M characters; 10M with ``--quick``).

Stages, each timed (wall clock) with the peak resident memory so far (``resource.getrusage`` ru_maxrss of this
process and, separately, of its finished child processes, e.g. ``--num-proc`` workers):
  1. generate: write the corpus to a temporary directory (random slices of Tiny Shakespeare with some non-ASCII
     text mixed in, ~80 distinct characters; fixed seed);
  2. load_corpus: ``load_dataset("text", sample_by="document")`` + the 90/10 character split;
  3. vocabulary: ``TxlCharTokenizer.from_corpus`` over the training text;
  4. tokenize: ``tokenize_to_array`` of train and validation (batched ``Dataset.map``, flat uint8 arrays);
  5. save + memmap: ``save_token_array`` then ``load_token_array(mmap=True)``;
  6. stream: one full epoch of ``StreamBatcher`` over the memory-mapped training tokens.
Run: ``.venv/bin/python bench/bench_data.py [--quick] [--num-proc N]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from hf_txl import DEFAULT_CORPUS_PATH, TxlCharTokenizer  # noqa: E402
from hf_txl.training.data import StreamBatcher, load_corpus, load_token_array, save_token_array, tokenize_to_array  # noqa: E402

EXTRA_TEXT = " Ωμέγα café naïve — “quoted” 中文 😀 ß "


def generate_corpus(path: str, num_chars: int, seed: int = 0) -> None:
    """Write ``num_chars`` characters made of random Tiny Shakespeare slices and a little non-ASCII text."""
    with open(DEFAULT_CORPUS_PATH, encoding="utf-8") as f:
        source = f.read()
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        while written < num_chars:
            start = int(rng.integers(0, len(source) - 100_000))
            block = source[start : start + 100_000] + EXTRA_TEXT
            block = block[: num_chars - written]
            out.write(block)
            written += len(block)


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident set size (MiB) of this process and of its waited-for children (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=100_000_000)
    parser.add_argument("--quick", action="store_true", help="10M characters instead of 100M")
    parser.add_argument("--num-proc", type=int, default=None, help="num_proc for Dataset.map")
    parser.add_argument("--batch-size", type=int, default=22)
    parser.add_argument("--tgt-len", type=int, default=512)
    args = parser.parse_args()
    num_chars = 10_000_000 if args.quick else args.chars
    datasets.disable_progress_bars()

    rows: list[tuple[str, float, str, float, float]] = []

    def stage(name: str, start: float, note: str = "") -> float:
        rows.append((name, time.perf_counter() - start, note, *peak_rss_mib()))
        return time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        t = time.perf_counter()
        generate_corpus(path, num_chars)
        t = stage("generate", t, f"{os.path.getsize(path) / 2**20:.0f} MiB file")
        corpus = load_corpus(train_file=path, cache_dir=os.path.join(tmp, "hf_cache"))
        t = stage("load_corpus", t)
        tok = TxlCharTokenizer.from_corpus(corpus["train"]["text"])
        t = stage("vocabulary", t, f"{len(tok)} tokens")
        train = tokenize_to_array(corpus["train"], tok, num_proc=args.num_proc)
        validation = tokenize_to_array(corpus["validation"], tok, num_proc=args.num_proc)
        n_tokens = len(train) + len(validation)
        assert n_tokens == num_chars, (n_tokens, num_chars)
        t = stage("tokenize", t, f"{n_tokens / 1e6:.0f}M tokens {train.dtype}")
        save_token_array(os.path.join(tmp, "train.npy"), train)
        del train, validation
        tokens = load_token_array(os.path.join(tmp, "train.npy"))
        t = stage("save + memmap", t)
        batcher = StreamBatcher(tokens, batch_size=args.batch_size, tgt_len=args.tgt_len)
        n_seen = 0
        for batch in batcher:
            n_seen += batch["input_ids"].numel()
        t = stage("stream 1 epoch", t, f"{len(batcher)} batches {args.batch_size}x{args.tgt_len}")
        assert n_seen == batcher.num_streams * batcher.stream_len

    total = sum(r[1] for r in rows if r[0] != "generate")
    print(f"corpus: {num_chars:,} generated characters, num_proc={args.num_proc}, {os.cpu_count()} CPUs")
    print(f"{'stage':<16} {'seconds':>8} {'peak RSS MiB':>13} {'children MiB':>13}  note")
    for name, seconds, note, own, children in rows:
        print(f"{name:<16} {seconds:>8.2f} {own:>13.0f} {children:>13.0f}  {note}")
    print(f"{'total (no gen)':<16} {total:>8.2f}")


if __name__ == "__main__":
    main()
