"""``python -m hf_txl.train`` / ``accelerate launch -m hf_txl.train``: the training script of an installed package.

The script itself is :mod:`hf_txl.training.train`; ``scripts/train.py`` is the same entry point in a checkout.
"""

from .training.train import main

if __name__ == "__main__":
    main()
