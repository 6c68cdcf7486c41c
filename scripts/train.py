#!/usr/bin/env python
"""Train a Transformer-XL language model with Accelerate: ``accelerate launch scripts/train.py [--help]``.

A thin entry point; the script is ``hf_txl.training.train`` (``accelerate launch -m hf_txl.train`` from an installed
package).
"""

from hf_txl.training.train import main

if __name__ == "__main__":
    main()
