"""Convert a transformers 4.x ``transfo-xl`` directory into a native hf_txl directory.

    python scripts/convert_legacy.py IN OUT

IN holds ``config.json`` (``model_type: transfo-xl``) and ``model.safetensors`` or ``pytorch_model.bin`` (read
with ``torch.load(weights_only=True)``), as written by ``TransfoXLLMHeadModel.save_pretrained``; OUT receives
``config.json`` (``model_type: hf_txl``), ``model.safetensors`` and hf_txl's configuration / modeling files, so
it loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` after ``import hf_txl``, or with
``trust_remote_code=True`` without it. A ``vocab.pkl`` next to the weights becomes a word-level
``tokenizer.json`` (read with a restricted unpickler: no pickled code runs). No pickle is written.

The converted config sets ``legacy_zero_mems=True``: like transformers 4.x, the first segment attends to
``mem_len`` zero vectors, so outputs equal the 4.x ones from the first token. The original Transformer-XL code
started from an empty memory; set ``legacy_zero_mems`` to false in OUT/config.json for that behaviour.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_txl  # noqa: E402  (registers the Auto classes)
from hf_txl.legacy import TxlLegacyForCausalLM, convert_vocab_pkl  # noqa: E402


def convert(in_dir: str | Path, out_dir: str | Path) -> hf_txl.TxlForCausalLM:
    """Load the legacy directory, copy its weights into a native model, save it to ``out_dir``; return the model."""
    legacy = TxlLegacyForCausalLM.from_pretrained(str(in_dir))
    native = hf_txl.TxlForCausalLM(legacy.config.to_native())
    missing, unexpected = native.load_state_dict(legacy.state_dict(), strict=True)
    assert not missing and not unexpected  # strict=True raised otherwise
    native.eval()
    native.save_pretrained(out_dir)
    vocab = Path(in_dir) / "vocab.pkl"
    if vocab.is_file():
        convert_vocab_pkl(vocab, out_dir)
    return native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a transformers 4.x transfo-xl directory to hf_txl.")
    parser.add_argument("input", help="directory saved by transformers<=4.35 TransfoXLLMHeadModel")
    parser.add_argument("output", help="directory to write the native hf_txl model to")
    args = parser.parse_args(argv)
    model = convert(args.input, args.output)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Wrote {args.output}: hf_txl TxlForCausalLM, {n_params:,} parameters, {torch.float32} safetensors.")
    print(
        "Note: legacy_zero_mems=True, as in transformers 4.x the first segment (mems=None) attends to mem_len zero "
        "vectors, so outputs match 4.x; the original Transformer-XL starts from an empty memory (set "
        '"legacy_zero_mems": false in config.json for that; first-segment outputs then differ slightly).'
    )
    if (Path(args.input) / "vocab.pkl").is_file():
        print(f"Converted vocab.pkl -> {Path(args.output) / 'tokenizer.json'} (word level, whitespace split).")


if __name__ == "__main__":
    main()
