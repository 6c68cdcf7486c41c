"""Command-line arguments of ``hf_txl.train``: flags, preset defaults, and checks that run before anything is
loaded or written.

Flag names follow transformers' ``run_clm_no_trainer.py`` where they overlap. Every user error is raised as
``UsageError``, which ``hf_txl.training.train.main`` prints as one ``train.py: error: ...`` line (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

from .overrides import parse_config_overrides
from .presets import DEFAULT_PRESET, PRESETS, get_preset

PROG = "train.py"


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """Re-raise the library's ValueError / FileNotFoundError (bad input, named by the library) as UsageError."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"{prefix}{error}") from error


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: the same one-line form, exit status 2
        raise UsageError(message)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="A datasets Hub dataset, e.g. wikitext (needs the network or a cache).")
    data.add_argument("--dataset_config_name", help="e.g. wikitext-103-raw-v1")
    data.add_argument("--train_file", help="A local text file (default: the bundled Tiny Shakespeare).")
    data.add_argument("--validation_file")
    data.add_argument("--text_column", default="text")
    data.add_argument("--validation_split_fraction", type=float, default=0.1, help="Held-out tail fraction.")
    data.add_argument("--tokenizer", choices=["char", "byte", "word"], help="Vocabulary to learn (preset's default).")
    data.add_argument("--min_frequency", type=int, help="Word level: rarer words become <unk> (default 1).")
    data.add_argument("--max_vocab_size", type=int, help="Word level: keep the most frequent words only.")
    data.add_argument("--tokenizer_name", help="Use a saved tokenizer directory instead of learning one.")
    data.add_argument("--preprocessing_num_workers", type=int)

    model = p.add_argument_group("model")
    model.add_argument("--preset", default=DEFAULT_PRESET, help=f"One of {sorted(PRESETS)}.")
    model.add_argument("--config_overrides", help='TxlConfig fields, e.g. "n_layer=6,cutoffs=[2000,6000]".')
    model.add_argument("--attn_implementation", choices=["sdpa", "eager", "flex_attention"], default="sdpa")
    model.add_argument("--tgt_len", type=int, help="Tokens per training segment.")
    model.add_argument("--mem_len", type=int, help="Memory length during training.")
    model.add_argument("--clamp_len", type=int, help="Clamp relative distances (-1: off).")
    model.add_argument("--eval_tgt_len", type=int)
    model.add_argument("--eval_mem_len", type=int, help="Memory length during evaluation (may exceed mem_len).")
    model.add_argument("--eval_clamp_len", type=int)
    model.add_argument("--eval_same_length", action="store_true", default=None)

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", help="Model directory (default: runs/txl-<preset>).")
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--per_device_train_batch_size", type=int)
    train.add_argument("--per_device_eval_batch_size", type=int)
    train.add_argument("--learning_rate", type=float)
    train.add_argument("--weight_decay", type=float)
    train.add_argument("--adam_beta1", type=float)
    train.add_argument("--adam_beta2", type=float)
    train.add_argument("--num_train_epochs", type=float,
                       help="Epochs instead of the preset's steps (an explicit --max_train_steps wins).")  # fmt: skip
    train.add_argument("--max_train_steps", type=int, help="Optimizer steps (overrides --num_train_epochs).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--lr_scheduler_type", default="cosine")
    train.add_argument("--num_warmup_steps", type=int)
    train.add_argument("--max_grad_norm", type=float)
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--eval_steps", type=int, help="Evaluate every N steps (0: only at the end).")
    train.add_argument("--max_eval_steps", type=int, help="Cap periodic evaluations at N segments (0: all).")
    train.add_argument("--checkpointing_steps", help="N (every N steps) or 'epoch'.")
    train.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the newest k checkpoints.")
    train.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint directory.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                       help="Overrides accelerate launch's setting; the softmax and the loss stay fp32.")  # fmt: skip
    train.add_argument("--num_threads", type=int,
                       help="CPU threads per process (default: accelerate launch's setting, or physical cores / "
                            "local processes where accelerate launch would pin each process to one).")  # fmt: skip
    train.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile.")
    train.add_argument("--with_tracking", action="store_true", help="Log to the Accelerate trackers.")
    train.add_argument("--report_to", default="all")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id")
    hub.add_argument("--hub_token")
    hub.add_argument("--hub_private_repo", action="store_true")
    return p


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    args = build_parser(description).parse_args(argv)
    apply_preset(args)
    check_args(args)
    return args


def apply_preset(args: argparse.Namespace) -> None:
    """Fill every flag left unset from the preset's training defaults."""
    with user_errors():
        preset = get_preset(args.preset)
    defaults = dict(
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, num_train_epochs=None, max_grad_norm=1.0,
        eval_steps=0, max_eval_steps=0, eval_clamp_len=None, eval_same_length=False, tokenizer="char", min_frequency=1,
    )  # fmt: skip
    defaults.update(preset["train"])
    if args.num_train_epochs is not None:  # an explicit epoch count wins over the preset's number of steps
        defaults.pop("max_train_steps", None)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.eval_clamp_len is None:
        args.eval_clamp_len = args.clamp_len
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"txl-{args.preset}")
    args.model_preset = preset["model"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def check_args(args: argparse.Namespace) -> None:
    """Reject conflicting or impossible settings before anything is loaded or written."""
    _require(
        not (args.dataset_name and (args.train_file or args.validation_file)),
        "--dataset_name and --train_file/--validation_file are alternatives; pass one source.",
    )
    _require(not (args.validation_file and not args.train_file), "--validation_file needs --train_file.")
    _require(
        not (args.resume_from_checkpoint and args.overwrite_output_dir),
        "--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir deletes it.",
    )
    _require(
        not (args.push_to_hub and not args.hub_model_id),
        "--push_to_hub needs --hub_model_id (e.g. your-name/txl-shakespeare).",
    )
    for name in ("tgt_len", "eval_tgt_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "min_frequency"):  # fmt: skip
        _require(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("mem_len", "eval_mem_len", "eval_steps", "max_eval_steps", "num_warmup_steps",
                 "checkpoints_total_limit", "weight_decay", "max_grad_norm"):  # fmt: skip
        _require(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}.")
    _require(
        math.isfinite(args.learning_rate) and args.learning_rate > 0,
        f"--learning_rate must be a positive number, got {args.learning_rate}.",
    )
    for name in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(args, name) < 1.0, f"--{name} must lie in [0, 1), got {getattr(args, name)}.")
    _require(
        args.num_train_epochs is None or args.num_train_epochs > 0,
        f"--num_train_epochs must be > 0, got {args.num_train_epochs}.",
    )
    _require(not (args.eval_same_length and args.eval_mem_len == 0), "--eval_same_length needs --eval_mem_len > 0.")
    _require(
        args.max_train_steps is None or args.max_train_steps >= 1,
        f"--max_train_steps must be >= 1, got {args.max_train_steps}.",
    )
    _require(args.num_threads is None or args.num_threads >= 1, f"--num_threads must be >= 1, got {args.num_threads}.")
    _require(
        args.max_vocab_size is None or args.max_vocab_size >= 1,
        f"--max_vocab_size must be >= 1, got {args.max_vocab_size}.",
    )
    _require(
        args.tokenizer == "word" or (args.min_frequency == 1 and args.max_vocab_size is None),
        "--min_frequency and --max_vocab_size apply to --tokenizer word only.",
    )
    steps = args.checkpointing_steps
    _require(
        steps in (None, "epoch") or str(steps).isdigit(),
        f"--checkpointing_steps must be an integer or 'epoch', got {steps!r}.",
    )
    if steps is not None and steps != "epoch":
        args.checkpointing_steps = int(steps)
        _require(args.checkpointing_steps >= 1, "--checkpointing_steps must be >= 1.")
    _require(
        0.0 < args.validation_split_fraction < 1.0,
        f"--validation_split_fraction must lie in (0, 1), got {args.validation_split_fraction}.",
    )
    from ..configuration_txl import TxlConfig

    with user_errors("--config_overrides: "):
        args.model_overrides = parse_config_overrides(args.config_overrides, TxlConfig().to_dict())


def plain_args(args: argparse.Namespace) -> dict:
    """The JSON-serialisable arguments (trackers, checkpoints and the exported training_args.json)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
