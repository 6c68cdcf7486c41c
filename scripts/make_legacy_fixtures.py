"""Build the legacy ``transfo-xl`` reference fixtures in ``tests/fixtures/legacy/`` (not run by CI).

Small random ``TransfoXLLMHeadModel`` s are built with the *real* transformers 4.35.2 implementation, saved with
its ``save_pretrained`` (safetensors; one as ``pytorch_model.bin``), and fed a sequence in two segments (the
memory of the first is passed to the second). Their log-probabilities (``prediction_scores``) are written next to
the weights in ``reference.json``; ``tests/test_legacy.py`` loads every directory with hf_txl and compares.

The ``long_generation*`` cases are decoded greedily far past ``mem_len`` (more than 3 x mem_len new tokens) the way
``generate()`` decodes with a memory: the prompt as one segment, then one token per forward call with the previous
call's ``mems``. The loop is explicit (4.35.2's own ``generate()`` is only checked against it, since some 4.x
versions re-fed the whole prefix at every step); its tokens and per-step log-probabilities go to
``generation.json``. Their weights are drawn with a larger ``init_std`` so that the memory changes the predictions.

The 4.35.2 environment is the benchmark's reference one (``bench/bench_speed.py`` creates ``bench/.venv-ref``), or
any venv with ``torch==2.13.0 transformers==4.35.2`` (and ``sacremoses`` for the ``vocab`` fixture)::

    .venv/bin/python scripts/make_legacy_fixtures.py --legacy-python bench/.venv-ref/bin/python
    .venv/bin/python scripts/make_legacy_fixtures.py --legacy-python bench/.venv-ref/bin/python \
        --only long_generation_plain

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

# name -> (TransfoXLConfig kwargs, (batch, prompt length, new tokens), seed): greedy decoding far past mem_len.
GENERATION = {
    # Adaptive (div_val 2), same_length + clamp_len as in the released wt103 model; larger weights (init_std 0.5 for
    # every weight, embedding and LayerNorm gain, proj_init_std for the projections), so that the memory matters.
    # Seeds whose greedy tokens do not settle into one repeated token (7 distinct in each; tail clusters included).
    "long_generation": (
        dict(vocab_size=32, cutoffs=[8, 20], d_model=16, d_embed=16, div_val=2, mem_len=4, clamp_len=3,
             same_length=True, pre_lnorm=False, untie_r=True, proj_share_all_but_first=True,
             init="normal", init_std=0.5, proj_init_std=0.5),
        (1, 6, 16), 2002,
    ),
    # No adaptive softmax, pre-norm, shared biases, no same_length: every step sees its whole memory, so a memory
    # kept one position too long (or too short) changes the log-probabilities (same_length above would hide it).
    "long_generation_plain": (
        dict(vocab_size=32, cutoffs=[], d_model=16, d_embed=16, div_val=1, mem_len=4, clamp_len=-1,
             same_length=False, pre_lnorm=True, untie_r=False, init="normal", init_std=0.5, proj_init_std=0.5),
        (1, 6, 16), 2014,
    ),
}  # fmt: skip


def build(only: list[str] | None = None) -> None:
    """Runs under transformers 4.35.2: write every fixture directory (or the ``only`` ones)."""
    import warnings

    import torch
    import transformers
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    assert transformers.__version__ == "4.35.2", transformers.__version__
    warnings.filterwarnings("ignore")
    for index, (name, (kwargs, as_bin, (batch, len1, len2))) in enumerate(CASES.items()):
        if only and name not in only:
            continue
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
    for name, (kwargs, shape, seed) in GENERATION.items():
        if not only or name in only:
            build_generation(name, kwargs, shape, seed)
    if not only or "vocab" in only:
        build_vocab()


def build_generation(name: str, kwargs: dict, shape: tuple[int, int, int], seed: int) -> None:
    """Greedy decoding one token per forward call with the memory (the reference), checked against 4.35.2's own
    ``generate()``; the tokens and per-step log-probabilities go to ``generation.json``."""
    import torch
    import transformers
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    batch, prompt_len, new_tokens = shape
    torch.manual_seed(seed)
    config = TransfoXLConfig(**COMMON, **kwargs)
    model = TransfoXLLMHeadModel(config).eval()
    assert new_tokens > 3 * config.mem_len
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len))
    tokens, log_probs, alone = [], [], []
    with torch.no_grad():
        out = model(prompt)  # the prompt as one segment (after the 4.x memory of mem_len zero vectors)
        for _ in range(new_tokens):
            scores = out.prediction_scores[:, -1]  # [B, V] log-probabilities of the next token
            token = scores.argmax(-1, keepdim=True)  # [B, 1]
            tokens.append(token)
            log_probs.append(scores)
            out = model(token, mems=out.mems)
            alone.append(model(token).prediction_scores[:, -1])  # the same token without its memory
        model.generation_config.eos_token_id = None  # (as a keyword it is ignored) the loop does not stop either
        theirs = model.generate(
            prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        model.generation_config.eos_token_id = config.eos_token_id
    tokens = torch.cat(tokens, 1)  # [B, N]
    log_probs = torch.stack(log_probs)  # [N, B, V]
    memory_effect = (torch.stack(alone[:-1]) - log_probs[1:]).abs().amax(-1)  # [N - 1, B]
    generate_gap = (torch.stack(theirs.scores).log_softmax(-1) - log_probs).abs().max().item()
    print(
        f"{name}: 4.35.2 generate() {'==' if torch.equal(theirs.sequences[:, prompt_len:], tokens) else '!='} the "
        f"step loop (log-prob max |diff| {generate_gap:.2e}); removing the memory changes a step's log-probs by "
        f"{memory_effect.min().item():.2f} to {memory_effect.max().item():.2f}; tokens {tokens.tolist()}"
    )
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    reference = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt": prompt.tolist(),
        "tokens": tokens.tolist(),
        "log_probs": [  # [N, B, V]: the log-probabilities of step n's token, 8 significant digits
            [[float(f"{v:.8g}") for v in row] for row in step] for step in log_probs.tolist()
        ],
    }
    (out / "generation.json").write_text(json.dumps(reference, separators=(",", ":")) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")


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
    names = [*CASES, *GENERATION, "vocab"]
    parser.add_argument("--only", nargs="+", choices=names, help="write these fixtures only (default: all)")
    args = parser.parse_args()
    if args.build:
        build(args.only)
        return
    if not args.legacy_python:
        parser.error("pass --legacy-python bench/.venv-ref/bin/python (transformers==4.35.2) or set LEGACY_PYTHON")
    only = ["--only", *args.only] if args.only else []
    subprocess.run([args.legacy_python, __file__, "--build", *only], check=True)


if __name__ == "__main__":
    main()
