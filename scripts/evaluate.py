#!/usr/bin/env python
"""Evaluate a Transformer-XL language model over a whole split, in order, with memory.

    python scripts/evaluate.py runs/txl-shakespeare                        # the run's own validation split
    python scripts/evaluate.py runs/txl-shakespeare --mem_len 0 64 192 512   # one row per memory length
    python scripts/evaluate.py runs/txl-shakespeare --tgt_len 32 --mem_len 512 --same_length --update_card
    python scripts/evaluate.py user/txl-shakespeare --validation_file my.txt  # a Hub model, another text

Reports the loss (nats/token), bits per character (loss / ln 2), perplexity and tokens/s for each setting, as a
Markdown table on stdout and as JSON (``--output_file``, default ``MODEL_DIR/evaluation.json``). The headline
follows the tokenizer's unit (hf_txl.tokenization_txl.token_unit): bits per character (byte) for character (byte)
models, perplexity per word for word models (the paper's WikiText-103 figure: every token scored, ``<eos>``
included), perplexity per token for other tokenizers. The figures come
from the ``txl_lm`` evaluate metric (hf_txl/metrics/txl_lm), as in training. ``--tgt_len``, ``--mem_len``,
``--clamp_len`` and ``--same_length`` may differ from training: the paper evaluates with a much longer memory than
it trains with. Without a data flag, the split is the one the model was trained against (from its
training_args.json), else the bundled Tiny Shakespeare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_txl.tokenization_txl import token_unit
from hf_txl.training import evaluate_stream, headline, keep_freed_memory_in_process
from hf_txl.training.data import load_corpus, separates_documents, tokenize_to_array
from hf_txl.training.hub import add_precision_arguments, is_local, load_model_and_tokenizer
from hf_txl.training.model_card import EVALUATION_FILE, write_model_card

#: The figure each token unit is judged by (bits per character/byte, or perplexity).
HEADLINE_METRIC = {"char": "bpc", "byte": "bpc", "word": "perplexity", "token": "perplexity"}
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_file", "validation_file", "text_column",
              "validation_split_fraction")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="A model directory (the --output_dir of scripts/train.py) or a Hub repository id.")
    data = p.add_argument_group("data (default: the model's training data, else the bundled Tiny Shakespeare)")
    data.add_argument("--dataset_name", help="A datasets Hub dataset (needs the network).")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_file", help="A local text file; its last --validation_split_fraction is evaluated.")
    data.add_argument("--validation_file", help="A local text file evaluated whole.")
    data.add_argument("--text_column")
    data.add_argument("--validation_split_fraction", type=float)
    data.add_argument("--split", default="validation", help="'validation' (default), 'train', or a dataset split.")
    settings = p.add_argument_group("evaluation settings (default: those of the training run's evaluation)")
    settings.add_argument("--tgt_len", type=int, help="Tokens per segment.")
    settings.add_argument("--mem_len", type=int, nargs="+", help="Memory length(s); several give one row each.")
    settings.add_argument("--clamp_len", type=int, help="Clamp relative distances (-1: off).")
    settings.add_argument("--same_length", action=argparse.BooleanOptionalAction, default=None,
                          help="Every query sees the same number of keys (rows with mem_len 0 ignore it).")  # fmt: skip
    settings.add_argument("--batch_size", type=int, help="Contiguous streams evaluated side by side.")
    settings.add_argument("--max_eval_steps", type=int, default=0, help="Stop after N segments (0: the whole split).")
    p.add_argument("--tokenizer_name", help="Load the tokenizer from here (a model directory lacking one).")
    p.add_argument("--attn_implementation", choices=["sdpa", "eager", "flex_attention"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_arguments(p)
    p.add_argument("--output_file", help="JSON results (default: MODEL_DIR/evaluation.json, or ./evaluation.json).")
    p.add_argument("--update_card", action="store_true", help="Re-render MODEL_DIR/README.md with these results.")
    args = p.parse_args(argv)
    for name in ("tgt_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.mem_len and min(args.mem_len) < 0:
        fail(f"--mem_len must be >= 0, got {args.mem_len}.")
    if args.update_card and not is_local(args.model):
        fail("--update_card rewrites the card of a local model directory; download the model first.")
    return args


def fail(message: str) -> None:
    raise SystemExit(f"evaluate.py: error: {message}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    keep_freed_memory_in_process()
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model, device=args.device, attn_implementation=args.attn_implementation,
            tokenizer_name=args.tokenizer_name, dtype=args.dtype, quantize=args.quantize,
        )  # fmt: skip
    except (OSError, ValueError) as error:
        fail(str(error))
    unit = token_unit(tokenizer)
    run_args = read_training_args(args.model)
    settings = resolve_settings(args, model.config, run_args)
    data_kwargs, data_name = data_source(args, run_args)
    tokens = split_tokens(args, tokenizer, data_kwargs)
    print(f"Evaluating {args.model} on the {args.split} split of {data_name}: {len(tokens):,} tokens, "
          f"batch size {settings['batch_size']}, {args.device}.", file=sys.stderr)  # fmt: skip

    rows = []
    for mem_len in settings["mem_lens"]:
        same_length = settings["same_length"] and mem_len > 0
        try:
            metrics = evaluate_stream(
                model, tokens, batch_size=settings["batch_size"], tgt_len=settings["tgt_len"], mem_len=mem_len,
                clamp_len=settings["clamp_len"], same_length=same_length, max_steps=args.max_eval_steps,
                progress=sys.stderr.isatty(),
            )  # fmt: skip
        except ValueError as error:
            fail(str(error))
        row = {"tgt_len": settings["tgt_len"], "mem_len": mem_len, "clamp_len": settings["clamp_len"],
               "same_length": same_length, **metrics}  # fmt: skip
        rows.append(row)
        print(f"mem_len={mem_len}: {headline(row, unit)} ({row['tokens_per_s']:,.0f} tokens/s)", file=sys.stderr)

    print(format_table(rows, unit))
    report = {
        "model": str(args.model), "data": data_name, "split": args.split, "token_unit": unit,
        "headline_metric": HEADLINE_METRIC[unit], "batch_size": settings["batch_size"],
        "device": str(args.device), "dtype": args.dtype or "float32", "quantize": args.quantize,
        "max_eval_steps": args.max_eval_steps, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python scripts/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows,
    }  # fmt: skip
    output = Path(args.output_file) if args.output_file else default_output(args.model)
    output.write_text(json.dumps(report, indent=2))
    print(f"Results written to {output}", file=sys.stderr)
    if args.update_card:
        if output.resolve() != (Path(args.model) / EVALUATION_FILE).resolve():
            (Path(args.model) / EVALUATION_FILE).write_text(json.dumps(report, indent=2))
        print(f"Model card updated: {write_model_card(args.model)}", file=sys.stderr)
    return rows


def read_training_args(model: str) -> dict:
    path = Path(model) / "training_args.json"
    return json.loads(path.read_text()) if is_local(model) and path.is_file() else {}


def resolve_settings(args: argparse.Namespace, config, run_args: dict) -> dict:
    """Command-line values, else the training run's evaluation settings, else the model config's."""

    def pick(value, *fallbacks):
        for candidate in (value, *fallbacks):
            if candidate is not None:
                return candidate
        return None

    mem_lens = args.mem_len or [pick(run_args.get("eval_mem_len"), config.mem_len)]
    return {
        "tgt_len": pick(args.tgt_len, run_args.get("eval_tgt_len"), run_args.get("tgt_len"), 128),
        "mem_lens": mem_lens,
        "clamp_len": pick(args.clamp_len, run_args.get("eval_clamp_len"), config.clamp_len),
        "same_length": bool(pick(args.same_length, run_args.get("eval_same_length"), config.same_length)),
        "batch_size": pick(args.batch_size, run_args.get("per_device_eval_batch_size"), 8),
    }


def data_source(args: argparse.Namespace, run_args: dict) -> tuple[dict, str]:
    """``load_corpus`` keyword arguments and a readable name: the flags given, else the training run's data."""
    given = {name: getattr(args, name) for name in DATA_FLAGS if getattr(args, name) is not None}
    has_source = any(given.get(k) for k in ("dataset_name", "train_file", "validation_file"))
    source = given if has_source else {**{k: run_args[k] for k in DATA_FLAGS if run_args.get(k) is not None}, **given}
    if source.get("validation_file") and not source.get("train_file"):
        source["train_file"] = source["validation_file"]  # load_corpus needs a train split; only validation is read
    kwargs = {
        "dataset_name": source.get("dataset_name"), "dataset_config_name": source.get("dataset_config_name"),
        "train_file": source.get("train_file"), "validation_file": source.get("validation_file"),
        "text_column": source.get("text_column") or "text",
        "validation_fraction": source.get("validation_split_fraction") or 0.1,
    }  # fmt: skip
    name = source.get("dataset_name") or source.get("validation_file") or source.get("train_file")
    return kwargs, name or "the bundled Tiny Shakespeare"


def split_tokens(args: argparse.Namespace, tokenizer, data_kwargs: dict):
    """The token ids of the requested split, in order; documents (rows of a dataset) end with the eos, as in
    training (``separates_documents``)."""
    try:
        if args.split in ("train", "validation"):
            corpus = load_corpus(**data_kwargs)
            split, documents = corpus[args.split], separates_documents(tokenizer, *corpus.values())
        elif data_kwargs["dataset_name"]:
            from datasets import load_dataset

            split = load_dataset(data_kwargs["dataset_name"], data_kwargs["dataset_config_name"], split=args.split)
            documents = separates_documents(tokenizer, split)
        else:
            fail(f"--split {args.split!r}: local text files only have 'train' and 'validation' splits.")
        return tokenize_to_array(split, tokenizer, text_column=data_kwargs["text_column"], append_eos=documents)
    except (OSError, ValueError, ConnectionError) as error:
        fail(f"could not load the evaluation data ({error}).")


def unit_bits(unit: str) -> str:
    return "bits/byte" if unit == "byte" else "bpc"


def format_table(rows: list[dict], unit: str = "char") -> str:
    """A Markdown table, one row per setting (pasteable into a README); the headline figure follows ``unit``."""
    if unit not in ("char", "byte"):
        return _perplexity_table(rows, "word" if unit == "word" else "token")
    lines = [
        f"| tgt_len | mem_len | clamp_len | same_length | loss (nats/token) | {unit_bits(unit)} | perplexity | tokens "
        "| tokens/s |",
        "|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tgt_len']} | {r['mem_len']} | {r['clamp_len']} | {r['same_length']} | {r['loss']:.4f} | "
            f"{r['bpc']:.4f} | {r['perplexity']:.3f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def _perplexity_table(rows: list[dict], unit: str) -> str:
    lines = [
        f"| tgt_len | mem_len | clamp_len | same_length | perplexity (per {unit}) | loss (nats/{unit}) | {unit}s "
        f"| {unit}s/s |",
        "|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tgt_len']} | {r['mem_len']} | {r['clamp_len']} | {r['same_length']} | {r['perplexity']:.2f} | "
            f"{r['loss']:.4f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def default_output(model: str) -> Path:
    return Path(model) / EVALUATION_FILE if is_local(model) else Path(EVALUATION_FILE)


if __name__ == "__main__":
    main()
