"""Named model sizes and their training defaults (``scripts/train.py --preset NAME``).

Each preset holds ``model`` (TxlConfig fields; ``vocab_size`` comes from the tokenizer) and ``train``
(defaults of the training script's flags, ``tokenizer`` included: "char", "byte" or "word", see
``hf_txl.tokenization_txl.build_tokenizer``). Command-line flags given explicitly win over a preset.
Batch sizes are per device: the paper's batches are global, so divide them by the number of processes.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict[str, dict]] = {
    # A few thousand parameters: seconds on a CPU. For tests and smoke runs.
    "tiny": {
        "model": dict(d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64, dropout=0.0, dropatt=0.0),
        "train": dict(
            tgt_len=32, mem_len=32, eval_tgt_len=32, eval_mem_len=32, per_device_train_batch_size=4,
            per_device_eval_batch_size=4, learning_rate=3e-3, max_train_steps=30, num_warmup_steps=3,
            eval_steps=0, max_eval_steps=8, clamp_len=-1, tokenizer="char",
        ),
    },
    # The main job (accelerate launch scripts/train.py): Tiny Shakespeare, characters, <= 330 s and <= 1.60 nats/char
    # on 2 CPU cores (bench/bench_launch.py --part main_job: 297 s, 1.550).
    "shakespeare": {
        "model": dict(d_model=192, n_layer=4, n_head=4, d_head=48, d_inner=768, dropout=0.0, dropatt=0.0),
        "train": dict(
            tgt_len=64, mem_len=64, eval_tgt_len=64, eval_mem_len=128, per_device_train_batch_size=16,
            per_device_eval_batch_size=16, learning_rate=2e-3, max_train_steps=2400, num_warmup_steps=100,
            eval_steps=0, max_eval_steps=0, clamp_len=-1, weight_decay=0.01, adam_beta2=0.99, tokenizer="char",
        ),
    },
    # The demo at word level: Tiny Shakespeare split on whitespace (about 182k training words; words seen once
    # become <unk>, leaving a vocabulary of about 10k), the shakespeare body with an adaptive input and softmax
    # (3.0M parameters), a few minutes on a CPU.
    "shakespeare_word": {
        "model": dict(
            d_model=192, n_layer=4, n_head=4, d_head=48, d_inner=768, dropout=0.2, dropatt=0.0,
            cutoffs=[2000, 6000], div_val=2, tie_word_embeddings=True, proj_share_all_but_first=True,
        ),
        "train": dict(
            tgt_len=64, mem_len=64, eval_tgt_len=64, eval_mem_len=128, per_device_train_batch_size=16,
            per_device_eval_batch_size=16, learning_rate=1e-3, max_train_steps=1000, num_warmup_steps=100,
            eval_steps=0, max_eval_steps=0, clamp_len=-1, weight_decay=0.01, adam_beta2=0.99, tokenizer="word",
            min_frequency=2,
        ),
    },
    # The paper's enwik8 base model (12L, 512, 8x64, 2048; tgt 512, mem 512; eval tgt 80, mem 2100, clamp 820).
    "enwik8_base": {
        "model": dict(d_model=512, n_layer=12, n_head=8, d_head=64, d_inner=2048, dropout=0.1, dropatt=0.0),
        "train": dict(
            tgt_len=512, mem_len=512, eval_tgt_len=80, eval_mem_len=2100, clamp_len=820,
            per_device_train_batch_size=22, per_device_eval_batch_size=10, learning_rate=2.5e-4,
            max_train_steps=400000, num_warmup_steps=0, max_grad_norm=0.25, eval_steps=4000, max_eval_steps=0,
            eval_same_length=True, tokenizer="byte",
        ),
    },
    # The paper's WikiText-103 base model (the authors' run_wt103_base.sh: 16L, 410, 10x41, 2100, adaptive input
    # and softmax with cutoffs [20000, 40000, 200000], div_val 1, tied projections; tgt 150, mem 150, batch 60,
    # Adam 2.5e-4 cosine, no warmup, clip 0.25, 200k steps; eval tgt 64, mem 640, clamp 400, same_length):
    # 24.0 test perplexity. Words as the corpus has them (WikiText-103 is tokenized, rare words already <unk>);
    # the cutoffs need a vocabulary of more than 200,000 (WikiText-103 has 267,735 words).
    "wt103_base": {
        "model": dict(
            d_model=410, n_layer=16, n_head=10, d_head=41, d_inner=2100, dropout=0.1, dropatt=0.0,
            cutoffs=[20000, 40000, 200000], div_val=1, tie_word_embeddings=True, proj_share_all_but_first=True,
        ),
        "train": dict(
            tgt_len=150, mem_len=150, eval_tgt_len=64, eval_mem_len=640, clamp_len=-1, eval_clamp_len=400,
            eval_same_length=True, per_device_train_batch_size=60, per_device_eval_batch_size=10,
            learning_rate=2.5e-4, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=0.25,
            num_warmup_steps=0, max_train_steps=200000, eval_steps=4000, max_eval_steps=0, tokenizer="word",
        ),
    },
}  # fmt: skip

DEFAULT_PRESET = "shakespeare"


def get_preset(name: str) -> dict[str, dict]:
    """A deep copy of preset ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)} (see hf_txl/presets.py).")
    return copy.deepcopy(PRESETS[name])
