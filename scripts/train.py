#!/usr/bin/env python
"""Train a Transformer-XL language model with Accelerate, carrying the memory across segments.

    accelerate launch scripts/train.py                       # default preset on the bundled Tiny Shakespeare
    accelerate launch scripts/train.py --preset tiny --output_dir runs/tiny
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...

Flag names follow transformers' run_clm_no_trainer.py where they overlap. Each process keeps the memory of
its own rows of the token stream (see hf_txl.data.StreamBatcher); checkpoints hold everything needed for an
exact continuation (hf_txl.training). The final model directory loads with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

import hf_txl
from hf_txl import TxlCharTokenizer, TxlConfig, TxlForCausalLM
from hf_txl.data import StreamBatcher, load_corpus, tokenize_to_array
from hf_txl.hub import HubPushError, push_model_dir
from hf_txl.model_card import write_model_card
from hf_txl.presets import DEFAULT_PRESET, PRESETS, get_preset
from hf_txl.training import (
    CHECKPOINTS,
    cpu_has_native_bf16,
    evaluate_stream,
    keep_freed_memory_in_process,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

# Fields whose change makes a checkpoint unusable for this run.
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner", "pre_lnorm", "untie_r",
    "tie_word_embeddings", "mem_len",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="A datasets Hub dataset (needs the network).")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_file", help="A local text file (default: the bundled Tiny Shakespeare).")
    data.add_argument("--validation_file")
    data.add_argument("--text_column", default="text")
    data.add_argument("--validation_split_fraction", type=float, default=0.1, help="Held-out tail fraction.")
    data.add_argument("--tokenizer", choices=["char", "byte"], default="char", help="Vocabulary to learn.")
    data.add_argument("--tokenizer_name", help="Use a saved tokenizer directory instead of learning one.")
    data.add_argument("--preprocessing_num_workers", type=int)

    model = p.add_argument_group("model")
    model.add_argument("--preset", default=DEFAULT_PRESET, help=f"One of {sorted(PRESETS)}.")
    model.add_argument("--config_overrides", help='TxlConfig fields, e.g. "n_layer=6,dropout=0.2".')
    model.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
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
    train.add_argument("--num_train_epochs", type=float, help="Used when --max_train_steps is not given.")
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
    train.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile.")
    train.add_argument("--with_tracking", action="store_true", help="Log to the Accelerate trackers.")
    train.add_argument("--report_to", default="all")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id")
    hub.add_argument("--hub_token")
    hub.add_argument("--hub_private_repo", action="store_true")
    args = p.parse_args(argv)
    apply_preset(args)
    check_args(args)
    return args


def apply_preset(args: argparse.Namespace) -> None:
    """Fill every flag left unset from the preset's training defaults."""
    preset = get_preset(args.preset)
    defaults = dict(
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, num_train_epochs=None, max_grad_norm=1.0,
        eval_steps=0, max_eval_steps=0, eval_clamp_len=None, eval_same_length=False,
    )  # fmt: skip
    defaults.update(preset["train"])
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.eval_clamp_len is None:
        args.eval_clamp_len = args.clamp_len
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"txl-{args.preset}")
    args.model_preset = preset["model"]


def fail(message: str) -> None:
    raise SystemExit(f"train.py: error: {message}")


def check_args(args: argparse.Namespace) -> None:
    """Reject conflicting or impossible settings before anything is loaded or written."""
    if args.dataset_name and (args.train_file or args.validation_file):
        fail("--dataset_name and --train_file/--validation_file are alternatives; pass one source.")
    if args.validation_file and not args.train_file:
        fail("--validation_file needs --train_file.")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        fail("--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir deletes it.")
    if args.push_to_hub and not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id (e.g. your-name/txl-shakespeare).")
    for name in ("tgt_len", "eval_tgt_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("mem_len", "eval_mem_len", "eval_steps", "max_eval_steps", "num_warmup_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.eval_same_length and args.eval_mem_len == 0:
        fail("--eval_same_length needs --eval_mem_len > 0.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        fail(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}.")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        args.checkpointing_steps = int(args.checkpointing_steps)
        if args.checkpointing_steps < 1:
            fail("--checkpointing_steps must be >= 1.")
    if not 0.0 < args.validation_split_fraction < 1.0:
        fail(f"--validation_split_fraction must lie in (0, 1), got {args.validation_split_fraction}.")


def parse_overrides(text: str | None) -> dict:
    """'n_layer=6,dropout=0.2,pre_lnorm=true' -> typed values (JSON literals, else strings)."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            fail(f"--config_overrides: {item!r} is not key=value.")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in TxlConfig().to_dict():
            fail(f"--config_overrides: unknown TxlConfig field {key!r}.")
        try:
            overrides[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def check_output_dir(args: argparse.Namespace) -> None:
    """Never silently overwrite another run: its checkpoints are kept unless asked otherwise."""
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    existing = list_checkpoints(args.output_dir)
    if existing:
        fail(
            f"{args.output_dir} holds checkpoints of another run ({existing[-1][1].name}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
            "or choose another --output_dir."
        )
    if Path(args.output_dir, "config.json").exists():
        fail(
            f"{args.output_dir} already holds a trained model. Pass --overwrite_output_dir to replace it, "
            "or choose another --output_dir."
        )


def kill_hook_from_env():
    """Testing aid: HF_TXL_KILL_AT='after_step:N' or 'during_save:N' SIGKILLs this process there."""
    spec = os.environ.get("HF_TXL_KILL_AT")
    if not spec:
        return None
    where, step = spec.split(":")

    def hook(point: str, current: int) -> None:
        if point == where and current == int(step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


# ----------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------


def get_token_streams(args, accelerator):
    """Load the corpus, learn (or load) the tokenizer, and return (tokenizer, train ids, validation ids)."""
    corpus = load_corpus(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        validation_file=args.validation_file,
        text_column=args.text_column,
        validation_fraction=args.validation_split_fraction,
    )
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    elif args.tokenizer == "byte":
        tokenizer = TxlCharTokenizer.byte_level()
    else:
        texts = (t for split in ("train", "validation") for t in corpus[split][args.text_column])
        tokenizer = TxlCharTokenizer.from_corpus(texts)
    with accelerator.main_process_first():
        kwargs = dict(text_column=args.text_column, num_proc=args.preprocessing_num_workers)
        train_ids = tokenize_to_array(corpus["train"], tokenizer, **kwargs)
        eval_ids = tokenize_to_array(corpus["validation"], tokenizer, **kwargs)
    return tokenizer, train_ids, eval_ids


def build_config(args, tokenizer) -> TxlConfig:
    fields = dict(args.model_preset)
    fields.update(
        vocab_size=len(tokenizer), mem_len=args.mem_len, clamp_len=args.clamp_len,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    fields.update(parse_overrides(args.config_overrides))
    try:
        return TxlConfig(**fields)
    except ValueError as error:
        fail(f"invalid model configuration: {error}")


def make_optimizer(model, args):
    """AdamW; no weight decay on biases, LayerNorms, embeddings and the position biases u, v."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.dim() < 2 or "word_emb" in name or "r_w_bias" in name or "r_r_bias" in name
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused implementation runs one kernel per parameter group instead of a Python loop over tensors.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), fused=True)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def training_function(args: argparse.Namespace) -> dict:
    tracker = args.report_to if args.with_tracking else None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=tracker, project_dir=args.output_dir
    )
    check_output_dir(args)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and cpu_has_native_bf16() is False:
        accelerator.print(
            "Warning: --mixed_precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): the matrix products "
            "are emulated and run several times slower than fp32. Drop --mixed_precision for speed on this machine."
        )
    set_seed(args.seed)
    kill_hook = kill_hook_from_env()

    tokenizer, train_ids, eval_ids = get_token_streams(args, accelerator)
    config = build_config(args, tokenizer)
    try:  # both batchers are built now so that impossible sizes fail before any training
        train_batches = StreamBatcher.from_accelerator(
            train_ids, accelerator, batch_size=args.per_device_train_batch_size, tgt_len=args.tgt_len
        )
        StreamBatcher.from_accelerator(
            eval_ids, accelerator, batch_size=args.per_device_eval_batch_size, tgt_len=args.eval_tgt_len
        )
    except ValueError as error:
        fail(f"{error}")
    steps_per_epoch = math.ceil(len(train_batches) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil((args.num_train_epochs or 1.0) * steps_per_epoch)

    model = TxlForCausalLM._from_config(config, attn_implementation=args.attn_implementation)
    resume_path = (
        resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    )
    if resume_path is not None:
        check_resume_config(resume_path, config)
    optimizer = make_optimizer(model, args)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )  # fmt: skip
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, mems = 0, None
    if resume_path is not None:
        trainer_state, mems, stream_state = load_checkpoint(accelerator, resume_path)
        train_batches.load_state_dict(stream_state)
        step = trainer_state["step"]
        accelerator.print(f"Resumed from {resume_path} at step {step}.")
    elif args.overwrite_output_dir and accelerator.is_main_process:
        shutil.rmtree(Path(args.output_dir) / CHECKPOINTS, ignore_errors=True)
        Path(args.output_dir, "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.with_tracking:
        accelerator.init_trackers("hf_txl", config=plain_args(args))

    log = JsonLog(Path(args.output_dir) / "log.jsonl", accelerator.is_main_process, from_step=step)
    eval_kwargs = dict(
        batch_size=args.per_device_eval_batch_size, tgt_len=args.eval_tgt_len, mem_len=args.eval_mem_len,
        clamp_len=args.eval_clamp_len, same_length=args.eval_same_length, accelerator=accelerator,
    )  # fmt: skip

    def checkpoint(at_step):
        state = {
            "step": at_step, "epoch": train_batches.epoch, "num_processes": accelerator.num_processes,
            "model_config": config.to_dict(), "args": plain_args(args),
        }  # fmt: skip
        save_checkpoint(
            accelerator, args.output_dir, at_step, mems=mems, stream_state=train_batches.state_dict(),
            trainer_state=state, keep_last=args.checkpoints_total_limit, kill_hook=kill_hook,
        )  # fmt: skip

    accelerator.print(
        f"Training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters for {args.max_train_steps} steps "
        f"({steps_per_epoch} per epoch) on {accelerator.num_processes} process(es), {accelerator.device}."
    )
    bar = tqdm(total=args.max_train_steps, initial=step, disable=not accelerator.is_local_main_process)
    model.train()
    micro_losses, window_tokens, window_start = [], 0, time.perf_counter()
    tokens_per_micro_step = args.per_device_train_batch_size * args.tgt_len * accelerator.num_processes
    while step < args.max_train_steps:
        for batch in train_batches:
            if train_batches.new_epoch:
                mems = None  # the memory never crosses an epoch boundary
            with accelerator.accumulate(model):
                out = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"], mems=mems)
                mems = out.mems
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(out.loss.detach())
            window_tokens += tokens_per_micro_step
            if not accelerator.sync_gradients:
                continue

            step += 1
            loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            micro_losses = []
            if not math.isfinite(loss):
                fail(
                    f"the training loss became {loss} at step {step}; stopping. The last good checkpoint (if any) "
                    f"in {Path(args.output_dir) / CHECKPOINTS} is intact: lower --learning_rate or "
                    "--max_grad_norm and resume from it."
                )
            lr = scheduler.get_last_lr()[0]
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                record = {
                    "step": step,
                    "epoch": train_batches.epoch,
                    "loss": loss,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                }
                log.write(record)
                if args.with_tracking:
                    accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s}, step=step)
                window_tokens, window_start = 0, time.perf_counter()
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                metrics = evaluate_stream(model, eval_ids, max_steps=args.max_eval_steps, **eval_kwargs)
                log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
                if args.with_tracking:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                bar.write(f"step {step}: eval loss {metrics['loss']:.4f}, bpc {metrics['bpc']:.4f}")
            if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
                checkpoint(step)
            if kill_hook is not None:
                kill_hook("after_step", step)
            if step >= args.max_train_steps:
                break
        else:
            if args.checkpointing_steps == "epoch":
                checkpoint(step)
    bar.close()

    metrics = evaluate_stream(model, eval_ids, progress=accelerator.is_local_main_process, **eval_kwargs)
    log.write({"step": step, "final": True, **{f"eval_{k}": v for k, v in metrics.items()}})
    accelerator.print(
        f"Validation (whole split, in order, mem_len={args.eval_mem_len}): loss {metrics['loss']:.4f} nats/token, "
        f"bpc {metrics['bpc']:.4f}, perplexity {metrics['perplexity']:.3f} ({metrics['tokens']} tokens)."
    )
    export(args, accelerator, model, tokenizer, metrics, step)
    if args.with_tracking:
        accelerator.end_training()
    return metrics


def check_resume_config(path: Path, config: TxlConfig) -> None:
    saved = json.loads((path / "trainer_state.json").read_text())["model_config"]
    differing = [f for f in ARCHITECTURE_FIELDS if saved.get(f) != getattr(config, f)]
    if differing:
        details = ", ".join(f"{f}: checkpoint {saved.get(f)!r} vs now {getattr(config, f)!r}" for f in differing)
        fail(f"checkpoint {path} was trained with a different model configuration ({details}).")


def export(args, accelerator, model, tokenizer, metrics, step) -> None:
    """Write the final model directory: weights, config, generation config, tokenizer, code files, results,
    the model card (README.md) and its loss curve; then push it to the Hub when asked."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile wrapper
    if accelerator.is_main_process:
        unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
        unwrapped.save_pretrained(args.output_dir, save_function=accelerator.save)
        tokenizer.save_pretrained(args.output_dir)
        results = {"step": step, "eval_mem_len": args.eval_mem_len, "eval_tgt_len": args.eval_tgt_len, **metrics}
        Path(args.output_dir, "eval_results.json").write_text(json.dumps(results, indent=2))
        recorded = plain_args(args)
        recorded["command"] = "accelerate launch scripts/train.py " + " ".join(sys.argv[1:])
        recorded["hf_txl_version"] = hf_txl.__version__
        Path(args.output_dir, "training_args.json").write_text(json.dumps(recorded, indent=2))
        write_model_card(args.output_dir, repo_id=args.hub_model_id)
        accelerator.print(f"Model written to {args.output_dir} (model card: README.md)")
        if args.push_to_hub:
            try:
                url = push_model_dir(
                    args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo
                )
            except (HubPushError, ValueError) as error:
                fail(f"{error} The trained model is saved in {args.output_dir}.")
            accelerator.print(f"Pushed to https://huggingface.co/{args.hub_model_id} ({url})")
    accelerator.wait_for_everyone()


class JsonLog:
    """Append-only JSON-lines metrics log; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, from_step: int = 0):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= from_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plain_args(args: argparse.Namespace) -> dict:
    """The JSON-serialisable arguments (trackers, checkpoints and the exported training_args.json)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory_in_process()
    training_function(args)


if __name__ == "__main__":
    main()
