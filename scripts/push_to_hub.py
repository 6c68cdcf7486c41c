#!/usr/bin/env python
"""Publish an existing model directory to the Hugging Face Hub.

    hf auth login                                   # or: export HF_TOKEN=hf_...
    python scripts/push_to_hub.py runs/txl-shakespeare your-name/txl-shakespeare

The model card (README.md) is re-rendered first so that its usage snippets name the repository (``--no_card``
keeps the directory as it is). The folder is uploaded in one commit, without training checkpoints; on any
failure (no token, no network, no permission) nothing is reported as published and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_txl.training.hub import HubPushError, check_model_dir, push_model_dir
from hf_txl.training.model_card import write_model_card


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="The --output_dir of scripts/train.py.")
    p.add_argument("repo_id", help="<user-or-org>/<model-name> on the Hub (created if needed).")
    p.add_argument("--token", help="A Hub token with write access (default: HF_TOKEN or the `hf auth login` cache).")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--no_card", action="store_true", help="Do not re-render README.md before uploading.")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        path = check_model_dir(args.model_dir)
        if not args.no_card and (path / "training_args.json").is_file():
            write_model_card(path, repo_id=args.repo_id)
        url = push_model_dir(path, args.repo_id, token=args.token, private=args.private)
    except (OSError, ValueError, HubPushError) as error:
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Pushed {Path(args.model_dir)} to https://huggingface.co/{args.repo_id} ({url})")
    return url


if __name__ == "__main__":
    main()
