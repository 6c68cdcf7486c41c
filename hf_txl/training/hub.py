"""Model directories and the Hugging Face Hub: checking, loading for inference, and publishing.

Used by ``scripts/evaluate.py``, ``scripts/generate.py``, ``scripts/push_to_hub.py`` and ``scripts/train.py
--push_to_hub``. Every failure names the problem and the fix; a push either commits the whole folder or
raises :class:`HubPushError` (``upload_folder`` makes one commit, so nothing is ever half-published).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Files of a training run that do not belong in a published model repository.
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "*.tmp", ".tmp*", ".hf_txl.lock"]  # the run's, not the model's

# owner/name (or a bare name), as the Hub spells repository ids.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class HubPushError(RuntimeError):
    """A push to the Hub did not complete (no token, no network, no permission); nothing was committed."""


def check_model_dir(model_dir: str | Path) -> Path:
    """A directory that ``from_pretrained`` can load: config.json, weights and a tokenizer."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the --output_dir of a training run.")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a model directory; pass the --output_dir of a training run.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass the --output_dir of a run.")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights; export the model with save_pretrained.")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json (the model's tokenizer is missing); save it there with "
            "tokenizer.save_pretrained(model_dir), or copy tokenizer.json and tokenizer_config.json from the run."
        )
    return path


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` should be a local directory rather than a Hub repository id."""
    text = os.fspath(name_or_path)
    return Path(text).exists() or not _REPO_ID.match(text) or text.startswith((".", "~"))


DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes the scripts' --dtype takes
QUANTIZATIONS = ("int8",)  # what their --quantize takes: int8 weight-only through torchao


def precision_kwargs(dtype: str | None = None, quantize: str | None = None) -> dict:
    """``from_pretrained`` keyword arguments for weights in ``dtype`` (one of :data:`DTYPES`; None: as saved, float32
    for hf_txl's models) and ``quantize`` (``"int8"``: int8 weight-only, per output row, through transformers'
    ``TorchAoConfig``; needs torchao, the ``quantization`` extra). Raises ValueError naming the fix."""
    import torch

    kwargs = {}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        kwargs["dtype"] = getattr(torch, dtype)
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}.")
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError as error:
            raise ValueError(
                f"int8 quantization needs torchao, which is not installed ({error}); install it with "
                "pip install 'hf_txl[quantization]' (or pip install torchao)."
            ) from error
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
    return kwargs


def add_precision_arguments(parser) -> None:
    """``--dtype`` and ``--quantize`` of the inference scripts (see :func:`precision_kwargs`)."""
    parser.add_argument(
        "--dtype", choices=DTYPES,
        help="Weights (and the memory) in this dtype (default: as saved, float32). bfloat16 halves the bytes a "
        "generation step reads; on a CPU it is fast only with native bf16 (AVX512-BF16 or AMX).",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS,
        help="int8: int8 weight-only quantization at load time through transformers' TorchAoConfig (a quarter of "
        "float32's weight bytes; needs torchao: pip install 'hf_txl[quantization]').",
    )  # fmt: skip


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    device: str = "cpu",
    attn_implementation: str | None = None,
    tokenizer_name: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
):
    """``(model, tokenizer)`` for inference (eval mode) from a local model directory or a Hub repository id.

    A local directory is checked first (:func:`check_model_dir`) so that a wrong path fails with the reason,
    not with a Hub lookup error. ``tokenizer_name`` loads the tokenizer from elsewhere (a model directory whose
    tokenizer is missing). ``dtype`` / ``quantize``: see :func:`precision_kwargs`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_txl  # noqa: F401  (registers the Auto classes)

    text = os.fspath(name_or_path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs.update(precision_kwargs(dtype, quantize))
    if is_local(text):
        if tokenizer_name is None:
            check_model_dir(text)
        elif not (Path(text) / "config.json").is_file():
            raise FileNotFoundError(f"{text} is not a model directory (no config.json); pass a run's --output_dir.")
        model = AutoModelForCausalLM.from_pretrained(text, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(text, **kwargs)
        except OSError as error:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
            raise OSError(
                f"could not load {text!r}: there is no such local directory, and as a Hub repository id it failed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the path or "
                "the repository id"
                + ("; HF_HUB_OFFLINE is set, so the Hub is not contacted: unset it, or pass a local directory"
                   if offline else "; check the network, and for a private repository log in (hf auth login or "
                   "HF_TOKEN)")
                + "."
            ) from error  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or text)
    return model.to(device).eval(), tokenizer


def push_model_dir(model_dir, repo_id: str, *, token: str | None = None, private: bool = False, api=None) -> str:
    """Create ``repo_id`` (if needed) and upload ``model_dir`` in one commit; returns the commit URL.

    The token comes from ``token``, ``HF_TOKEN`` or the ``hf auth login`` cache (huggingface_hub's rules).
    Any failure (no token, no network, offline mode, no permission) raises :class:`HubPushError` naming the
    fix: nothing is reported as pushed unless the commit succeeded.
    """
    path = check_model_dir(model_dir)
    if not _REPO_ID.match(repo_id) or "/" not in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hub repository id; use <your-user-or-org>/<model-name>.")
    if api is None:
        from huggingface_hub import HfApi, get_token

        if not (token or get_token()):
            raise HubPushError(
                f"no Hugging Face token, so {repo_id} cannot be written: run `hf auth login`, or set HF_TOKEN "
                "(or pass --hub_token), then push again with scripts/push_to_hub.py "
                f"{path} {repo_id}. Nothing was uploaded."
            )
        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(path), repo_type="model", ignore_patterns=IGNORE_PATTERNS,
            commit_message="Upload hf_txl Transformer-XL model",
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001  (every failure means: not published)
        raise HubPushError(
            f"pushing {path} to {repo_id} failed ({type(error).__name__}: {error}). Nothing was published. "
            "Check the network (HF_HUB_OFFLINE must be unset), that your token can write to the repository "
            f"(hf auth login / HF_TOKEN), then rerun: python scripts/push_to_hub.py {path} {repo_id}"
        ) from error
    return str(getattr(commit, "commit_url", commit))
