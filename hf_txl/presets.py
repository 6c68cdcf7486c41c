"""Named model sizes and their training defaults (``scripts/train.py --preset NAME``).

Each preset holds ``model`` (TxlConfig fields; ``vocab_size`` comes from the tokenizer) and ``train``
(defaults of the training script's flags). Command-line flags given explicitly win over a preset.
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
            eval_steps=0, max_eval_steps=8, clamp_len=-1,
        ),
    },
    # The README's main job: Tiny Shakespeare, characters, a few minutes on 2 CPU cores.
    "shakespeare": {
        "model": dict(d_model=192, n_layer=4, n_head=4, d_head=48, d_inner=768, dropout=0.0, dropatt=0.0),
        "train": dict(
            tgt_len=64, mem_len=64, eval_tgt_len=64, eval_mem_len=128, per_device_train_batch_size=16,
            per_device_eval_batch_size=16, learning_rate=2e-3, max_train_steps=1500, num_warmup_steps=100,
            eval_steps=0, max_eval_steps=0, clamp_len=-1, weight_decay=0.01, adam_beta2=0.99,
        ),
    },
    # The paper's enwik8 base model (12L, 512, 8x64, 2048; tgt 512, mem 512; eval tgt 80, mem 2100, clamp 820).
    "enwik8_base": {
        "model": dict(d_model=512, n_layer=12, n_head=8, d_head=64, d_inner=2048, dropout=0.1, dropatt=0.0),
        "train": dict(
            tgt_len=512, mem_len=512, eval_tgt_len=80, eval_mem_len=2100, clamp_len=820,
            per_device_train_batch_size=22, per_device_eval_batch_size=10, learning_rate=2.5e-4,
            max_train_steps=400000, num_warmup_steps=0, max_grad_norm=0.25, eval_steps=4000, max_eval_steps=0,
            eval_same_length=True,
        ),
    },
}  # fmt: skip

DEFAULT_PRESET = "shakespeare"


def get_preset(name: str) -> dict[str, dict]:
    """A deep copy of preset ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)} (see hf_txl/presets.py).")
    return copy.deepcopy(PRESETS[name])
