#!/usr/bin/env python
"""Sample text from a Transformer-XL model, streaming each character to the terminal as it is produced.

    python scripts/generate.py runs/txl-shakespeare --prompt "ROMEO:"
    python scripts/generate.py runs/txl-shakespeare --prompt "KING:" --max_new_tokens 500 --temperature 0.8 --top_k 40
    python scripts/generate.py runs/txl-shakespeare --prompt "To be" --greedy
    python scripts/generate.py runs/txl-shakespeare --prompt "To be" --dtype bfloat16     # or --quantize int8

Generation carries the Transformer-XL memory from step to step (one new token per forward pass). Characters of
the prompt outside the model's vocabulary are mapped to the unknown token, with a warning.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from transformers import TextStreamer, set_seed

from hf_txl import UnknownCharacterWarning
from hf_txl.training.hub import add_precision_arguments, load_model_and_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="A model directory (the --output_dir of scripts/train.py) or a Hub repository id.")
    p.add_argument("--prompt", default="\n", help="Text to continue (default: a newline).")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature (> 0).")
    p.add_argument("--top_k", type=int, default=0, help="Sample among the k most likely tokens (0: all).")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass in (0, 1] (1: off).")
    p.add_argument("--greedy", action="store_true", help="Take the most likely token (no sampling).")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_stream", action="store_true", help="Print the text once, at the end.")
    p.add_argument("--tokenizer_name", help="Load the tokenizer from here (a model directory lacking one).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_arguments(p)
    args = p.parse_args(argv)
    if not args.prompt:
        fail("--prompt is empty: the model has no beginning-of-text token, give it at least one character.")
    if args.max_new_tokens < 1:
        fail(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    if args.temperature <= 0:
        fail(f"--temperature must be > 0, got {args.temperature} (use --greedy for the most likely token).")
    if args.top_k < 0:
        fail(f"--top_k must be >= 0, got {args.top_k}.")
    if not 0.0 < args.top_p <= 1.0:
        fail(f"--top_p must lie in (0, 1], got {args.top_p}.")
    return args


def fail(message: str) -> None:
    raise SystemExit(f"generate.py: error: {message}")


class CharStreamer(TextStreamer):
    """Prints every character as soon as it is complete (``TextStreamer`` waits for a space to print a word).

    A byte-level model can produce the first bytes of a multi-byte character; it is held back until complete.
    """

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("CharStreamer streams one sequence at a time")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            return
        self.on_finalized_text(text[self.print_len :])
        if text.endswith("\n"):  # keep the cache short
            self.token_cache, self.print_len = [], 0
        else:
            self.print_len = len(text)


def encode_prompt(tokenizer, prompt: str):
    """The prompt's ids; characters outside the vocabulary become the unknown token, with a warning naming them."""
    with warnings.catch_warnings():  # reported once below, whatever the tokenizer class
        warnings.simplefilter("ignore", UnknownCharacterWarning)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    unk_id = tokenizer.unk_token_id
    n_unknown = int((inputs["input_ids"] == unk_id).sum()) if unk_id is not None else 0
    if n_unknown:
        vocab = tokenizer.get_vocab()
        missing = sorted({ch for ch in prompt if ch not in vocab})
        print(
            f"generate.py: warning: {n_unknown} character(s) of the prompt are not in the model's vocabulary and "
            f"were mapped to {tokenizer.unk_token!r}: {missing}. The model cannot see them; rephrase the prompt "
            "with characters of its training text.",
            file=sys.stderr,
        )
    return inputs


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model, device=args.device, tokenizer_name=args.tokenizer_name, dtype=args.dtype, quantize=args.quantize
        )
    except (OSError, ValueError) as error:
        fail(str(error))
    inputs = encode_prompt(tokenizer, args.prompt).to(args.device)
    set_seed(args.seed)
    streamer = None if args.no_stream else CharStreamer(tokenizer, skip_prompt=False)
    sampling = {} if args.greedy else dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    output = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id, **sampling,
    )  # fmt: skip
    text = tokenizer.decode(output[0], skip_special_tokens=False)
    if args.no_stream:
        print(text)
    return text


if __name__ == "__main__":
    main()
