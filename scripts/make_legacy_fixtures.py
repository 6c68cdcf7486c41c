"""Build the legacy ``transfo-xl`` reference fixtures in ``tests/fixtures/legacy/`` (not run by CI).

Small random ``TransfoXLLMHeadModel`` s are built with the *real* transformers 4.35.2 implementation, saved with
its ``save_pretrained`` (safetensors; one as ``pytorch_model.bin``), and fed a sequence in two segments (the
memory of the first is passed to the second). Their log-probabilities (``prediction_scores``) are written next to
the weights in ``reference.json``; ``tests/test_legacy.py`` loads every directory with hf_txl and compares.

The 4.35.2 environment lives outside the repository, e.g. beside it::

    python3 -m venv ../legacy_venv
    ../legacy_venv/bin/pip install torch==2.13.0 transformers==4.35.2 sacremoses
    .venv/bin/python scripts/make_legacy_fixtures.py --legacy-python ../legacy_venv/bin/python

(``LEGACY_PYTHON`` may replace ``--legacy-python``.) The script re-runs itself under that interpreter with
``--build``; it imports nothing from hf_txl. ``sacremoses`` is only needed for the ``vocab.pkl`` fixture, which
is written by the 4.35.2 ``TransfoXLTokenizer.save_vocabulary`` (a real legacy pickle, read by the tests only
through hf_txl's restricted unpickler).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "legacy"

COMMON = dict(n_layer=2, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, eos_token_id=0)

# name -> (TransfoXLConfig kwargs, save as .bin?, (batch, first segment length, second segment length))
CASES = {
    # No adaptive softmax: one full softmax, embeddings tied; post-norm, per-layer biases.
    "plain": (
        dict(vocab_size=60, cutoffs=[], d_model=16, d_embed=16, div_val=1, mem_len=4, clamp_len=-1,
             same_length=False, pre_lnorm=False, untie_r=True),
        False, (2, 5, 3),
    ),
    # No adaptive softmax, d_embed != d_model (projections), untied output, pre-norm, shared biases, .bin file.
    "plain_proj_bin": (
        dict(vocab_size=50, cutoffs=[], d_model=16, d_embed=8, div_val=1, mem_len=3, clamp_len=2,
             same_length=True, pre_lnorm=True, untie_r=False, tie_word_embeddings=False),
        True, (2, 4, 3),
    ),
    # Adaptive, div_val 1, three cutoffs, no projections (d_embed == d_model), same_length + clamp_len.
    "adaptive_div1": (
        dict(vocab_size=120, cutoffs=[20, 50, 80], d_model=16, d_embed=16, div_val=1, mem_len=5, clamp_len=3,
             same_length=True, pre_lnorm=False, untie_r=True),
        False, (2, 4, 3),
    ),
    # Adaptive, div_val 1 with projections shared all-but-first, pre-norm, shared biases.
    "adaptive_div1_proj": (
        dict(vocab_size=100, cutoffs=[30, 60], d_model=16, d_embed=24, div_val=1, mem_len=4, clamp_len=-1,
             same_length=False, pre_lnorm=True, untie_r=False, proj_share_all_but_first=True),
        False, (2, 4, 3),
    ),
    # Adaptive, div_val 4, two cutoffs, projections shared all-but-first, same_length + clamp_len.
    "adaptive_div4": (
        dict(vocab_size=150, cutoffs=[20, 70], d_model=16, d_embed=32, div_val=4, mem_len=4, clamp_len=2,
             same_length=True, pre_lnorm=False, untie_r=True, proj_share_all_but_first=True),
        False, (2, 4, 3),
    ),
    # Adaptive, div_val 4, three cutoffs, nothing shared (untied output, own projections), pre-norm.
    "adaptive_div4_untied": (
        dict(vocab_size=130, cutoffs=[10, 40, 90], d_model=16, d_embed=64, div_val=4, mem_len=6, clamp_len=-1,
             same_length=True, pre_lnorm=True, untie_r=False, proj_share_all_but_first=False,
             tie_word_embeddings=False),
        False, (2, 4, 4),
    ),
}  # fmt: skip


def build() -> None:
    """Runs under transformers 4.35.2: write every fixture directory."""
    import warnings

    import torch
    import transformers
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    assert transformers.__version__ == "4.35.2", transformers.__version__
    warnings.filterwarnings("ignore")
    for index, (name, (kwargs, as_bin, (batch, len1, len2))) in enumerate(CASES.items()):
        torch.manual_seed(1000 + index)
        config = TransfoXLConfig(**COMMON, **kwargs)
        model = TransfoXLLMHeadModel(config).eval()
        with torch.no_grad():  # random weights far from the init (every bias and LayerNorm non-trivial)
            for pname, param in model.named_parameters():  # tied parameters appear once and stay tied
                noise = torch.randn_like(param) * 0.15
                param.copy_(1.0 + noise if "layer_norm.weight" in pname else noise)
        ids = torch.randint(0, config.vocab_size, (batch, len1 + len2))
        with torch.no_grad():
            first = model(ids[:, :len1])
            second = model(ids[:, len1:], mems=first.mems)
        out = FIXTURES / name
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("model.safetensors", "pytorch_model.bin"):
            (out / stale).unlink(missing_ok=True)
        model.save_pretrained(out, safe_serialization=not as_bin)
        reference = {
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "input_ids": ids.tolist(),
            "segments": [len1, len2],
            "log_probs": [  # prediction_scores [B, T, V] of each segment, 9 significant digits (float32 round trip)
                [[[float(f"{v:.9g}") for v in row] for row in seq] for seq in scores.tolist()]
                for scores in (first.prediction_scores, second.prediction_scores)
            ],
        }
        (out / "reference.json").write_text(json.dumps(reference, separators=(",", ":")) + "\n")
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")
    build_vocab()


def build_vocab() -> None:
    """A real 4.35.2 ``vocab.pkl`` (``TransfoXLTokenizer.save_vocabulary``) for the restricted-unpickler test."""
    from transformers import TransfoXLTokenizer

    tokenizer = TransfoXLTokenizer(special=["<eos>", "<unk>"], lower_case=False, delimiter=" ")
    tokenizer.count_sents([s.split() for s in ["the cat sat on the mat", "a dog ran to the cat"]])
    tokenizer.build_vocab()
    out = FIXTURES / "vocab"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_vocabulary(str(out))
    reference = {
        "text": "the cat sat on a mat",
        "ids": tokenizer.encode("the cat sat on a mat"),
        "vocab": tokenizer.idx2sym,
    }
    (out / "reference.json").write_text(json.dumps(reference) + "\n")
    print(f"vocab: {len(tokenizer)} symbols -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--legacy-python", default=os.environ.get("LEGACY_PYTHON"), help="python of the 4.35.2 venv")
    parser.add_argument("--build", action="store_true", help="(internal) build under the current interpreter")
    args = parser.parse_args()
    if args.build:
        build()
        return
    if not args.legacy_python:
        parser.error("pass --legacy-python /path/to/venv/bin/python (transformers==4.35.2) or set LEGACY_PYTHON")
    subprocess.run([args.legacy_python, __file__, "--build"], check=True)


if __name__ == "__main__":
    main()
