"""Language-model figures from per-token losses: mean loss, bits per character (token) and perplexity.

An ``evaluate`` metric module that loads offline from its path (it needs nothing from the Hub)::

    import evaluate
    from hf_txl.training import METRIC_PATH           # .../hf_txl/training/metrics/txl_lm
    metric = evaluate.load(METRIC_PATH)
    metric.add_batch(losses=[2.1, 1.7, 0.4])          # per-token negative log-likelihoods, in nats
    metric.compute()  # {"loss": 1.4, "bpc": 2.0198, "perplexity": 4.0552, "num_tokens": 3}

For long streams, pass per-batch sums with the number of tokens each covers instead of one value per token
(cheap to accumulate, and the form that can be reduced across processes before computing the figures once)::

    metric.add_batch(losses=[nll_sum_of_batch], num_tokens=[tokens_in_batch])
    metric.compute()

``num_tokens`` defaults to 1 per loss, so per-token losses need no weights.

Figures, with L the mean negative log-likelihood in nats over N scored tokens:

* ``loss`` = L,
* ``bpc`` = L / ln 2: bits per token, i.e. bits per character for a character vocabulary (bits per byte for a
  byte vocabulary), the figure reported on enwik8 / text8,
* ``perplexity`` = exp(L) (capped at exp(700) to stay finite), the figure reported on WikiText-103,
* ``num_tokens`` = N.

The training loop (``hf_txl.training.lm_metrics``) and ``scripts/evaluate.py`` both get their figures from
:func:`lm_figures` here, so they cannot disagree.
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    losses: negative log-likelihoods in nats (natural log): one value per scored token, or, with num_tokens,
        the summed loss of num_tokens[i] tokens.
    num_tokens: (optional) how many tokens losses[i] sums over; 1 for every loss when omitted.
Returns:
    loss: mean negative log-likelihood per token (nats),
    bpc: bits per token (loss / ln 2); bits per character for a character-level model,
    perplexity: exp(loss),
    num_tokens: number of scored tokens.
Examples:
    >>> metric = evaluate.load("path/to/hf_txl/metrics/txl_lm")
    >>> metric.compute(losses=[6.931471805599453], num_tokens=[10])["bpc"]
    1.0
"""

_CITATION = """\
@inproceedings{dai2019transformerxl,
  title = {Transformer-{XL}: Attentive Language Models beyond a Fixed-Length Context},
  author = {Dai, Zihang and Yang, Zhilin and Yang, Yiming and Carbonell, Jaime and Le, Quoc and Salakhutdinov, Ruslan},
  booktitle = {Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics},
  year = {2019},
  url = {https://arxiv.org/abs/1901.02860}
}
"""

_MAX_LOG_PERPLEXITY = 700.0  # exp(709.8) overflows a float64


def lm_figures(nll_sum: float, num_tokens: int) -> dict[str, float]:
    """``loss``, ``bpc``, ``perplexity`` and ``num_tokens`` from a summed loss (nats) over ``num_tokens`` tokens."""
    if num_tokens <= 0:
        raise ValueError(f"no scored tokens (num_tokens={num_tokens}): the figures are undefined for an empty stream")
    loss = float(nll_sum) / num_tokens
    return {
        "loss": loss,
        "bpc": loss / math.log(2),
        "perplexity": math.exp(min(loss, _MAX_LOG_PERPLEXITY)),
        "num_tokens": int(num_tokens),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TxlLm(evaluate.Metric):
    """Mean loss, bits per character and perplexity of a language model from its per-token losses."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
            reference_urls=["https://arxiv.org/abs/1901.02860"],
        )

    def add_batch(self, *, losses=None, num_tokens=None, **kwargs) -> None:
        """Add losses (per token, or per-batch sums with ``num_tokens``)."""
        super().add_batch(losses=losses, num_tokens=_ones_if_missing(losses, num_tokens), **kwargs)

    def compute(self, *, losses=None, num_tokens=None, **kwargs) -> dict[str, float] | None:
        """The figures over everything added so far plus ``losses`` (see the module docstring)."""
        num_tokens = _ones_if_missing(losses, num_tokens)
        if losses is None:
            return super().compute(**kwargs)
        return super().compute(losses=losses, num_tokens=num_tokens, **kwargs)

    def _compute(self, losses, num_tokens) -> dict[str, float]:
        if len(losses) == 0:
            raise ValueError("no losses were added: call add_batch(losses=...) or compute(losses=...) first")
        return lm_figures(math.fsum(losses), int(sum(num_tokens)))


def _ones_if_missing(losses, num_tokens):
    """Per-token losses count one token each."""
    if num_tokens is None and losses is not None:
        return [1] * len(losses)
    return num_tokens
