"""Train a Transformer-XL language model with Accelerate, carrying the memory across segments.

    accelerate launch scripts/train.py                       # default preset on the bundled Tiny Shakespeare
    accelerate launch -m hf_txl.train --preset tiny          # the same from an installed package
    accelerate launch scripts/train.py --preset shakespeare_word --tokenizer word   # words, adaptive softmax
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...
    accelerate launch --config_file configs/fsdp2.yaml scripts/train.py ...      # FSDP2, TxlLayer wrapped

Each process keeps the memory of its own rows of the token stream (``hf_txl.training.data.StreamBatcher``); checkpoints
hold everything needed for an exact continuation (``hf_txl.training.checkpointing``). The final model directory loads
with ``AutoModelForCausalLM.from_pretrained``. Flags: ``hf_txl.training.args`` (``--help``).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors import SafetensorError
from transformers import AutoTokenizer, get_scheduler

from ..configuration_txl import TxlConfig
from ..modeling_txl import TxlForCausalLM
from ..tokenization_txl import build_tokenizer, generation_eos_token_id, token_unit
from .args import PROG, UsageError, parse_args, plain_args, user_errors
from .checkpointing import (
    CHECKPOINTS,
    CheckpointWriteError,
    check_resume_config,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from .checkpointing import save_checkpoint as save_checkpoint_dir
from .data import StreamBatcher, load_corpus, separates_documents, tokenize_to_array
from .evaluation import evaluate_stream, headline
from .export import export_model_dir
from .faults import (
    EXIT_PREEMPTED,
    OutputDirInUse,
    OutputDirLock,
    StopRequest,
    check_free_space,
    first_failure,
    write_error_message,
)
from .hub import HubPushError, push_model_dir
from .progress import TrainingProgress, make_optimizer
from .runtime import configure_cpu_threads, cpu_has_native_bf16, enable_fsdp_on_cpu, keep_freed_memory_in_process

# ----------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------


def get_token_streams(args, accelerator):
    """Load the corpus, learn (or load) the tokenizer, and return (tokenizer, train ids, validation ids).

    A corpus with several rows in a split (a Hub dataset of documents) gets the end-of-text id after each row, so
    the model learns where a document ends; a local file or the bundled corpus (read whole, one row per split) is
    one document and gets none, and neither does a word-level corpus (its rows are lines, each already ending with
    the ``<eos>`` word): ``hf_txl.training.data.separates_documents``."""
    with user_errors():
        corpus = load_corpus(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
            train_file=args.train_file, validation_file=args.validation_file, text_column=args.text_column,
            validation_fraction=args.validation_split_fraction,
        )  # fmt: skip
        if args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        else:
            # A character vocabulary covers both splits; a word vocabulary comes from training text only (the
            # paper's), so unseen validation words are <unk>.
            splits = ("train",) if args.tokenizer == "word" else ("train", "validation")
            texts = (t for split in splits for t in corpus[split][args.text_column])
            tokenizer = build_tokenizer(
                args.tokenizer, texts, min_frequency=args.min_frequency, max_vocab_size=args.max_vocab_size
            )
        documents = separates_documents(tokenizer, *corpus.values())
        with accelerator.main_process_first():
            kwargs = dict(text_column=args.text_column, num_proc=args.preprocessing_num_workers, append_eos=documents)
            train_ids = tokenize_to_array(corpus["train"], tokenizer, **kwargs)
            eval_ids = tokenize_to_array(corpus["validation"], tokenizer, **kwargs)
    return tokenizer, train_ids, eval_ids


def build_config(args, tokenizer) -> TxlConfig:
    """The model configuration: the preset, the tokenizer's sizes and ids, then ``--config_overrides``.

    ``eos_token_id`` (where ``generate`` stops) is the tokenizer's end-of-text id for character and byte models
    and None for word models, whose ``<eos>`` is every line end (``generation_eos_token_id``)."""
    fields = dict(args.model_preset)
    fields.update(
        vocab_size=len(tokenizer), mem_len=args.mem_len, clamp_len=args.clamp_len,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=generation_eos_token_id(tokenizer),
    )  # fmt: skip
    fields.update(args.model_overrides)
    with user_errors("invalid model configuration: "):
        return TxlConfig(**fields)


def prepare_output_dir(args, accelerator) -> None:
    """Never silently overwrite another run: its checkpoints are kept unless asked otherwise."""
    if not (args.resume_from_checkpoint or args.overwrite_output_dir):
        existing = list_checkpoints(args.output_dir)
        if existing:
            raise UsageError(
                f"{args.output_dir} holds checkpoints of another run ({existing[-1][1].name}). Pass "
                "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
                "or choose another --output_dir."
            )
        if Path(args.output_dir, "config.json").exists():
            raise UsageError(
                f"{args.output_dir} already holds a trained model. Pass --overwrite_output_dir to replace it, "
                "or choose another --output_dir."
            )
    if args.overwrite_output_dir and accelerator.is_main_process:
        shutil.rmtree(Path(args.output_dir) / CHECKPOINTS, ignore_errors=True)
        Path(args.output_dir, "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)


class TrainingFault(Exception):
    """The run stopped on a fault of the machine or the training (a full disk, a non-finite loss): one line, exit 1,
    everything saved before intact."""


class Preempted(Exception):
    """The run stopped on SIGTERM / SIGUSR1 after writing a checkpoint: exit ``EXIT_PREEMPTED``."""


def lock_output_dir(args, accelerator) -> OutputDirLock | None:
    """One run per --output_dir: the main process takes the directory's lock (every process learns whether it got
    it), before any checkpoint is read or anything deleted, --overwrite_output_dir included."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = None, [None]
    if accelerator.is_main_process:
        lock = OutputDirLock(args.output_dir)
        try:
            lock.acquire()
        except OutputDirInUse as error:
            lock, refusal = None, [str(error)]
        except OSError as error:
            lock, refusal = None, [write_error_message("the lock file", Path(args.output_dir), error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise UsageError(refusal[0])
    return lock


def distribution(accelerator) -> str:
    """How the run is distributed, for the log: ``FSDP2``, ``MULTI_CPU`` (DDP on CPUs), ``MULTI_GPU``, ``NO``..."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return accelerator.distributed_type.value


# ----------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------


def make_accelerator(args) -> Accelerator:
    """The Accelerator (FSDP honoured on CPU processes too), with the CPU thread count chosen and said."""
    # Gradient accumulation is done by the training loop (windows end with the epoch), not by the Accelerator.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )  # fmt: skip
    enable_fsdp_on_cpu(accelerator)
    if accelerator.device.type == "cpu":
        accelerator.print(f"Using {configure_cpu_threads(args.num_threads, accelerator.num_processes)}.")
        if accelerator.mixed_precision == "bf16" and cpu_has_native_bf16() is False:
            accelerator.print(
                "Warning: bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): the matrix products are emulated "
                "and run several times slower than fp32. Drop --mixed_precision for speed on this machine."
            )
    return accelerator


def find_checkpoint(args, accelerator) -> Path | None:
    """The checkpoint to resume from (damaged ones named and skipped for 'latest'), before anything is written."""
    if not args.resume_from_checkpoint:
        return None
    with user_errors():
        return resolve_checkpoint(
            args.output_dir, args.resume_from_checkpoint, on_damaged=lambda m: accelerator.print(f"Warning: {m}")
        )


def get_batches(args, accelerator, train_ids, eval_ids) -> StreamBatcher:
    """The training batcher; the evaluation one is built too, so that impossible sizes fail before training."""
    with user_errors():
        StreamBatcher.from_accelerator(
            eval_ids, accelerator, batch_size=args.per_device_eval_batch_size, tgt_len=args.eval_tgt_len
        )
        return StreamBatcher.from_accelerator(
            train_ids, accelerator, batch_size=args.per_device_train_batch_size, tgt_len=args.tgt_len
        )


def build_training_objects(args, accelerator, config):
    """Model, optimizer (prepared together, as FSDP2 needs) and learning-rate schedule."""
    model = TxlForCausalLM._from_config(config, attn_implementation=args.attn_implementation)
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = make_optimizer(model, learning_rate=args.learning_rate, weight_decay=args.weight_decay, betas=betas)
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    embedding = accelerator.unwrap_model(model, keep_torch_compile=False).transformer.word_emb
    if config.uses_adaptive() and hasattr(embedding, "set_reshard_after_forward"):
        # FSDP2: Accelerate shards the input embedding as a unit of its own, released after its forward; the adaptive
        # softmax reads its cluster weights and projections at the end of the forward, so keep them gathered until
        # the backward is done (what Accelerate does for a tied embedding it recognises).
        embedding.set_reshard_after_forward(False)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )  # fmt: skip
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def resume(accelerator, path: Path, batches: StreamBatcher, args, optimizer, scheduler) -> tuple[int, object]:
    """Restore every state from checkpoint ``path``; returns (step, this process's memory). A --learning_rate other
    than the checkpoint's scales the restored schedule from here on (e.g. lower, after a non-finite loss)."""
    with user_errors():
        trainer_state, mems, stream_state = load_checkpoint(accelerator, path)
        batches.load_state_dict(stream_state)
    accelerator.print(f"Resumed from {path} at step {trainer_state['step']}.")
    saved_rate = trainer_state.get("args", {}).get("learning_rate")
    if saved_rate and saved_rate != args.learning_rate:
        scale = args.learning_rate / saved_rate
        for group in optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
        scheduler.base_lrs = [rate * scale for rate in scheduler.base_lrs]
        accelerator.print(
            f"Learning rate {args.learning_rate:g} instead of the checkpoint's {saved_rate:g}: the schedule is scaled "
            f"by {scale:g} from step {trainer_state['step'] + 1}."
        )
    return trainer_state["step"], mems


def save_checkpoint(args, accelerator, step, *, mems, batches, config) -> Path:
    state = {
        "step": step, "epoch": batches.epoch, "num_processes": accelerator.num_processes,
        "model_config": config.to_dict(), "args": plain_args(args),
    }  # fmt: skip
    try:
        return save_checkpoint_dir(
            accelerator, args.output_dir, step, mems=mems, stream_state=batches.state_dict(), trainer_state=state,
            keep_last=args.checkpoints_total_limit,
        )  # fmt: skip
    except CheckpointWriteError as error:
        raise TrainingFault(str(error)) from None


def accumulation_window(position: int, steps_in_epoch: int, accumulation_steps: int) -> int:
    """How many micro-batches the optimizer step of micro-batch ``position`` (1-based in its epoch) gathers: windows
    of ``accumulation_steps`` from the start of the epoch, the last one ending with the epoch (as transformers'
    ``Trainer`` does), so every epoch has ``ceil(steps_in_epoch / accumulation_steps)`` optimizer steps and a
    checkpoint at an epoch's end lies between two windows."""
    start = (position - 1) // accumulation_steps * accumulation_steps
    return min(accumulation_steps, steps_in_epoch - start)


def check_finite(loss: float, step: int, args) -> None:
    """A non-finite loss stops the run before anything of this step is saved, naming the checkpoint to resume."""
    if math.isfinite(loss):
        return
    saved = list_checkpoints(args.output_dir)
    last = f"the last checkpoint, {saved[-1][1]}, is intact" if saved else "no checkpoint was written yet"
    raise TrainingFault(
        f"the training loss became {loss} at step {step}; stopped, {last}. Resume with --resume_from_checkpoint "
        "latest and a lower --learning_rate (or --max_grad_norm)."
    )


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def training_function(args) -> dict:
    accelerator = make_accelerator(args)
    lock = lock_output_dir(args, accelerator)
    stop = StopRequest().install()
    try:
        return train_locked(args, accelerator, stop)
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()


def train_locked(args, accelerator, stop: StopRequest) -> dict:
    resume_path = find_checkpoint(args, accelerator)
    prepare_output_dir(args, accelerator)
    set_seed(args.seed)
    tokenizer, train_ids, eval_ids = get_token_streams(args, accelerator)
    config = build_config(args, tokenizer)
    batches = get_batches(args, accelerator, train_ids, eval_ids)
    if resume_path is not None:
        with user_errors():
            check_resume_config(resume_path, config)
    steps_per_epoch = math.ceil(len(batches) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil((args.num_train_epochs or 1.0) * steps_per_epoch)
    model, optimizer, scheduler = build_training_objects(args, accelerator, config)
    step, mems = 0, None
    if resume_path is not None:
        step, mems = resume(accelerator, resume_path, batches, args, optimizer, scheduler)
    if args.with_tracking:
        accelerator.init_trackers("hf_txl", config=plain_args(args))
    progress = TrainingProgress(
        accelerator, args.output_dir, total_steps=args.max_train_steps, start_step=step,
        logging_steps=args.logging_steps, tracking=args.with_tracking,
        tokens_per_micro_step=args.per_device_train_batch_size * args.tgt_len * accelerator.num_processes,
    )  # fmt: skip
    evaluation = dict(
        batch_size=args.per_device_eval_batch_size, tgt_len=args.eval_tgt_len, mem_len=args.eval_mem_len,
        clamp_len=args.eval_clamp_len, same_length=args.eval_same_length, accelerator=accelerator,
    )  # fmt: skip
    unit = token_unit(tokenizer)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    accelerator.print(
        f"Training {n_params:.2f}M parameters for {args.max_train_steps} steps ({steps_per_epoch} per epoch) "
        f"on {accelerator.num_processes} process(es) ({distribution(accelerator)}), {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}."
    )

    model.train()
    micro_losses = []
    while step < args.max_train_steps:
        for batch in batches:
            if batches.new_epoch:
                mems = None  # the memory never crosses an epoch boundary
            window = accumulation_window(batches.step, len(batches), args.gradient_accumulation_steps)
            last_of_window = len(micro_losses) + 1 == window
            with contextlib.nullcontext() if last_of_window else accelerator.no_sync(model):
                out = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"], mems=mems)
                mems = out.mems
                accelerator.backward(out.loss / window)  # the window's gradient is the mean of its micro-batches'
            micro_losses.append(out.loss.detach())
            progress.micro_step()
            if not last_of_window:
                continue
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            micro_losses = []
            if not math.isfinite(loss):
                progress.close()  # the bar's last line before the error's
            check_finite(loss, step, args)
            progress.step(step, loss=loss, lr=scheduler.get_last_lr()[0], epoch=batches.epoch)
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                metrics = evaluate_stream(model, eval_ids, max_steps=args.max_eval_steps, **evaluation)
                progress.evaluation(step, metrics, message=f"step {step}: eval {headline(metrics, unit)}")
            saved = None
            if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
                saved = save_checkpoint(args, accelerator, step, mems=mems, batches=batches, config=config)
            if stop.agreed(accelerator):  # SIGTERM / SIGUSR1: this step is done; checkpoint it and leave
                saved = saved or save_checkpoint(args, accelerator, step, mems=mems, batches=batches, config=config)
                progress.close()
                raise Preempted(
                    f"stopped by {stop.name} after step {step}: checkpoint {saved} written; continue with "
                    "--resume_from_checkpoint latest (same --output_dir and number of processes)."
                )
            if step >= args.max_train_steps:
                break
        if args.checkpointing_steps == "epoch" and batches.step == len(batches):  # an epoch ended (the last one too)
            save_checkpoint(args, accelerator, step, mems=mems, batches=batches, config=config)
    progress.close()

    metrics = evaluate_stream(model, eval_ids, progress=accelerator.is_local_main_process, **evaluation)
    message = f"Validation (whole split, in order, mem_len={args.eval_mem_len}): {headline(metrics, unit)}"
    progress.evaluation(step, metrics, message=f"{message} ({metrics['tokens']} tokens).", final=True)
    export(args, accelerator, model, tokenizer, metrics, step)
    if args.with_tracking:
        accelerator.end_training()
    return metrics


def export(args, accelerator, model, tokenizer, metrics: dict, step: int) -> None:
    """Write the final model directory (the full weights, gathered from every process), then push it when asked."""
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type == DistributedType.FSDP
    state_dict = accelerator.get_state_dict(model) if sharded else None  # every process gathers its shards
    failure = None
    if accelerator.is_main_process:
        recorded = {**plain_args(args), "command": "accelerate launch scripts/train.py " + " ".join(sys.argv[1:])}
        results = {"step": step, "eval_mem_len": args.eval_mem_len, "eval_tgt_len": args.eval_tgt_len, **metrics}
        unwrapped = accelerator.unwrap_model(model)
        weights = sum(p.numel() * p.element_size() for p in unwrapped.parameters())
        failure = check_free_space("the model export", Path(args.output_dir), weights)
        try:
            if failure is None:
                export_model_dir(
                    args.output_dir, unwrapped, tokenizer, state_dict=state_dict,
                    eval_results=results, training_args=recorded, repo_id=args.hub_model_id,
                )  # fmt: skip
        except (OSError, RuntimeError, SafetensorError) as error:
            failure = write_error_message("the model export", Path(args.output_dir), error, needed=weights)
    failure = first_failure(accelerator, failure)
    if failure is not None:
        raise TrainingFault(failure)
    if accelerator.is_main_process:
        accelerator.print(f"Model written to {args.output_dir} (model card: README.md)")
        if args.push_to_hub:
            try:
                url = push_model_dir(
                    args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo
                )
            except (HubPushError, ValueError) as error:
                raise UsageError(f"{error} The trained model is saved in {args.output_dir}.") from error
            accelerator.print(f"Pushed to https://huggingface.co/{args.hub_model_id} ({url})")
    accelerator.wait_for_everyone()


def main(argv=None) -> None:
    """Exit status: 0 done, 2 a usage error, 1 a fault (full disk, non-finite loss), ``EXIT_PREEMPTED`` (75) stopped
    by SIGTERM / SIGUSR1 after a checkpoint. Each non-zero exit prints one line."""
    try:
        args = parse_args(argv, description=__doc__)
        keep_freed_memory_in_process()
        training_function(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingFault as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Preempted as stopped:
        print(f"{PROG}: {stopped}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None


if __name__ == "__main__":
    main()
