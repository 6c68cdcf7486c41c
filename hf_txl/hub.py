"""Publishing a model directory to the Hugging Face Hub (``--push_to_hub`` and scripts/push_to_hub.py)."""

from __future__ import annotations

from pathlib import Path

# Files of a training run that do not belong in a published model repository.
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "*.tmp", ".tmp*"]


def check_model_dir(model_dir: str | Path) -> Path:
    """A directory that ``from_pretrained`` can load: config.json, weights and a tokenizer."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass the --output_dir of a run.")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights; export the model with save_pretrained.")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; save the tokenizer with tokenizer.save_pretrained.")
    return path


def push_model_dir(model_dir, repo_id: str, *, token: str | None = None, private: bool = False, api=None) -> str:
    """Create ``repo_id`` (if needed) and upload ``model_dir`` in one commit; returns the commit URL.

    The token comes from ``token``, ``HF_TOKEN`` or the ``hf auth login`` cache (huggingface_hub's rules).
    Errors (no network, no token, no permission) propagate: nothing is reported as pushed unless the
    commit succeeded.
    """
    from huggingface_hub import HfApi

    path = check_model_dir(model_dir)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(path), repo_type="model", ignore_patterns=IGNORE_PATTERNS,
        commit_message="Upload hf_txl Transformer-XL model",
    )  # fmt: skip
    return str(getattr(commit, "commit_url", commit))
