"""Exact, atomic, verified training checkpoints.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<N>`` holding

* what ``accelerator.save_state`` writes (weights as safetensors, optimizer, scheduler, every process's RNG
  states; Accelerate reads its ``.bin``/``.pkl`` files back with ``torch.load(weights_only=True)``),
* ``mems_<rank>.safetensors``: the training memory of every process,
* ``stream_<rank>.json``: every process's stream position,
* ``trainer_state.json``: step counter, model config and the arguments of the run,
* ``manifest.json``: the size and SHA-256 of every other file, written last.

It is written to a hidden temporary directory and renamed into place when complete, so a run killed while
saving leaves the previous checkpoint untouched and loadable. The manifest finds damage (a truncated or
overwritten file) before anything is loaded: ``resume_from_checkpoint="latest"`` then falls back to the newest
intact checkpoint with a warning, and an explicit path to a damaged checkpoint is refused, naming the file.
Nothing is deleted or rewritten while resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..cache_txl import TxlCache
from .faults import check_free_space, directory_bytes, first_failure, write_error_message

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: TxlConfig fields whose change makes a checkpoint unusable for a run.
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner", "pre_lnorm", "untie_r",
    "tie_word_embeddings", "mem_len", "cutoffs", "div_val", "d_embed", "proj_share_all_but_first",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or written by another kind of run."""


# ----------------------------------------------------------------------------------------------------
# Finding and verifying
# ----------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> None:
    """Record the size and SHA-256 of every file in checkpoint directory ``path`` (the manifest excepted)."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(path).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def find_damage(path: Path) -> str | None:
    """None when checkpoint ``path`` matches its manifest, else a sentence naming the first damaged file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (a checkpoint written before manifests, or a deleted file)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is not a valid manifest"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, {expected['bytes']} were saved (truncated or overwritten)"
        if _sha256(file) != expected["sha256"]:
            return f"{file} does not match the checksum saved with the checkpoint (overwritten or corrupted)"
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, name: str, *, on_damaged=None) -> Path:
    """``latest`` (the newest intact checkpoint in ``output_dir``; ``on_damaged(message)``, by default a warning,
    names each newer damaged one) or an explicit path to an intact checkpoint; ``CheckpointError`` naming the
    problem otherwise."""
    if name != "latest":
        path = Path(name)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(
                f"--resume_from_checkpoint {name}: not a complete checkpoint (no {TRAINER_STATE} there). "
                f"Checkpoints live in <output_dir>/{CHECKPOINTS}/step_<N>; 'latest' picks the newest intact one."
            )
        damage = find_damage(path)
        if damage is not None:
            raise CheckpointError(
                f"--resume_from_checkpoint {name}: the checkpoint is damaged: {damage}. Resume from another "
                "checkpoint ('latest' picks the newest intact one); nothing was changed."
            )
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(
            f"--resume_from_checkpoint latest: no checkpoint under {Path(output_dir) / CHECKPOINTS}; "
            "start without --resume_from_checkpoint, or pass the path of a checkpoint directory."
        )
    for _, path in reversed(found):
        damage = find_damage(path)
        if damage is None:
            return path
        message = f"skipping damaged checkpoint {path}: {damage}; it is left as it is."
        if on_damaged is None:
            warnings.warn(message, stacklevel=2)
        else:
            on_damaged(message)
    raise CheckpointError(
        f"--resume_from_checkpoint latest: every checkpoint under {Path(output_dir) / CHECKPOINTS} is damaged "
        "(see the warnings above); nothing was changed. Start a new run in another --output_dir."
    )


def check_resume_config(path: Path, config) -> None:
    """Refuse a checkpoint whose model architecture differs from ``config`` (``CheckpointError`` naming fields)."""
    saved = json.loads((path / TRAINER_STATE).read_text())["model_config"]
    differing = [f for f in ARCHITECTURE_FIELDS if f in saved and saved[f] != getattr(config, f, None)]
    if differing:
        details = ", ".join(f"{f}: checkpoint {saved.get(f)!r} vs now {getattr(config, f)!r}" for f in differing)
        raise CheckpointError(f"checkpoint {path} was trained with a different model configuration ({details}).")


# ----------------------------------------------------------------------------------------------------
# The memory
# ----------------------------------------------------------------------------------------------------


def save_mems(mems: TxlCache | None, path: Path) -> None:
    tensors, metadata = {}, {}
    if mems is not None and not mems.is_empty:
        tensors = {f"layer_{i}": m.detach().contiguous().cpu() for i, m in enumerate(mems)}
        if mems.padding_mask is not None:
            tensors["padding_mask"] = mems.padding_mask.contiguous().cpu()
        metadata["seen_tokens"] = str(mems.get_seq_length())
    save_file(tensors, str(path), metadata=metadata)


def load_mems(path: Path, device) -> TxlCache | None:
    # Read on the CPU, then move: safetensors refuses an indexed CPU device ("cpu:0", that of multi-process CPU runs).
    tensors = {name: tensor.to(device) for name, tensor in load_file(str(path)).items()}
    if not tensors:
        return None
    with safe_open(str(path), framework="pt") as handle:
        seen = (handle.metadata() or {}).get("seen_tokens")
    layers = sorted((k for k in tensors if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    memory = [tensors[k] for k in layers]
    return TxlCache(memory, tensors.get("padding_mask"), seen_tokens=None if seen is None else int(seen))


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (no space, a quota, any write error); its partial files were removed."""


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    mems: TxlCache | None,
    stream_state: dict,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically (all processes must call this), keep the newest ``keep_last``.

    Before writing, the main process checks that the device has room for a checkpoint as large as the newest one.
    A write that fails on any process (a full disk included) removes the partial checkpoint and raises
    ``CheckpointWriteError`` with one line on every process; the earlier checkpoints are left as they were."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    what = f"checkpoint {final.name}"
    failure = None
    if accelerator.is_main_process:
        for stale in root.glob(".tmp_step_*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        existing = list_checkpoints(output_dir)
        if existing:
            failure = check_free_space(what, root, directory_bytes(existing[-1][1]))
        if failure is None:
            failure = _try_write(what, root, lambda: tmp.mkdir(parents=True))
    _raise_if_any(accelerator, failure, tmp)

    def write_own_part():
        accelerator.save_state(str(tmp))
        rank = accelerator.process_index
        save_mems(mems, tmp / f"mems_{rank}.safetensors")
        (tmp / f"stream_{rank}.json").write_text(json.dumps(stream_state))

    _raise_if_any(accelerator, _try_write(what, root, write_own_part), tmp)

    def complete():
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        write_manifest(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)

    failure = _try_write(what, root, complete) if accelerator.is_main_process else None
    _raise_if_any(accelerator, failure, tmp)
    if accelerator.is_main_process:
        for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _try_write(what: str, root: Path, write) -> str | None:
    """Run ``write()``; None, or the one-line message of its failure (OSError, torch's or safetensors' errors)."""
    try:
        write()
    except (OSError, RuntimeError, SafetensorError) as error:
        return write_error_message(what, root, error)
    return None


def _raise_if_any(accelerator, failure: str | None, tmp: Path) -> None:
    """Every process learns whether any failed (a collective call); then the partial checkpoint is removed and
    ``CheckpointWriteError`` raised everywhere."""
    first = first_failure(accelerator, failure)
    if first is None:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    raise CheckpointWriteError(first)


def load_checkpoint(accelerator, path: Path) -> tuple[dict[str, Any], TxlCache | None, dict]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer_state, this process's mems,
    this process's stream position)."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    saved_processes = trainer_state.get("num_processes", 1)
    if saved_processes != accelerator.num_processes:
        raise CheckpointError(
            f"Checkpoint {path} was written by {saved_processes} process(es) but this run has "
            f"{accelerator.num_processes}; the memory and stream positions are per process. Resume with "
            f"--num_processes {saved_processes}."
        )
    accelerator.load_state(str(path))
    rank = accelerator.process_index
    mems = load_mems(path / f"mems_{rank}.safetensors", accelerator.device)
    stream_state = json.loads((path / f"stream_{rank}.json").read_text())
    return trainer_state, mems, stream_state
