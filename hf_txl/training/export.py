"""The export of a trained model directory: weights (unsharded from FSDP2), config, tokenizer, the flat code files,
metrics, arguments and the model card.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def unsharded_class(model):
    """Give an FSDP2 model its own class back for a while (``FSDPTxlForCausalLM`` -> ``TxlForCausalLM``).

    ``fully_shard`` swaps the class of each module it wraps for a subclass defined in torch; ``save_pretrained``
    would then copy torch's FSDP source files as the model's code and name them in ``config.json``'s ``auto_map``.
    A no-op for any other model.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if not issubclass(sharded_class, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def share_tied_tensors(model, state_dict: dict) -> dict:
    """``state_dict`` with every name of a tied parameter (one object under several names, e.g. ``lm_head.weight``
    and ``transformer.word_emb.weight``) pointing at one tensor.

    Full weights gathered from FSDP shards hold a separate copy per name; ``save_pretrained`` drops the duplicates
    of shared tensors only, so without this the export would store the tied weight twice (and differ from an
    unsharded run's).
    """
    shared, first_name = dict(state_dict), {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in shared:
            shared[name] = shared[first_name.setdefault(id(param), name)]
    return shared


def export_model_dir(
    output_dir: str | os.PathLike,
    model,
    tokenizer,
    *,
    state_dict: dict | None = None,
    eval_results: dict,
    training_args: dict,
    repo_id: str | None = None,
) -> None:
    """Write a trained model directory (call on the main process only): weights, config, generation config,
    tokenizer, the flat code files, ``eval_results.json``, ``training_args.json`` and the model card (README.md)
    with its loss curve. ``model`` is the unwrapped model; ``state_dict`` the full weights when they were
    gathered from shards (``accelerator.get_state_dict``)."""
    from .. import __version__
    from .model_card import write_model_card

    output_dir = Path(output_dir)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if state_dict is not None:
        state_dict = share_tied_tensors(model, state_dict)
    with staged(output_dir) as stage:  # written whole, then moved into place: a failed write leaves no half export
        with unsharded_class(model):
            model.save_pretrained(stage, state_dict=state_dict)
        tokenizer.save_pretrained(stage)
        (stage / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        record = {**training_args, "hf_txl_version": __version__}
        (stage / "training_args.json").write_text(json.dumps(record, indent=2))
        write_model_card(stage, repo_id=repo_id)


@contextlib.contextmanager
def staged(output_dir: Path):
    """A staging directory ``<output_dir>/.tmp_export`` (holding a link to the run's ``log.jsonl`` for the card's
    loss curve); on success its files replace those of ``output_dir`` one rename each, on any error it is removed
    and ``output_dir`` keeps what it had (an earlier export included)."""
    stage = output_dir / ".tmp_export"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    log = output_dir / "log.jsonl"
    try:
        if log.is_file():
            try:
                os.link(log, stage / log.name)
            except OSError:  # a file system without hard links
                shutil.copyfile(log, stage / log.name)
        yield stage
        (stage / log.name).unlink(missing_ok=True)
        for file in stage.iterdir():
            os.replace(file, output_dir / file.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
