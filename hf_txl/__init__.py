"""hf_txl: Transformer-XL (Dai et al. 2019, arXiv 1901.02860) for the Hugging Face ecosystem.

Importing this package registers the model with the transformers Auto classes, so that
``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``
resolve ``model_type="hf_txl"`` directories without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache_txl import TxlCache
from .configuration_txl import TxlConfig
from .modeling_txl import (
    TxlForCausalLM,
    TxlForSequenceClassification,
    TxlModel,
    TxlPreTrainedModel,
)

TxlMems = TxlCache  # the memory's name in hf_txl 0.1 (and the paper's `mems`)

AutoConfig.register(TxlConfig.model_type, TxlConfig, exist_ok=True)
AutoModel.register(TxlConfig, TxlModel, exist_ok=True)
AutoModelForCausalLM.register(TxlConfig, TxlForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TxlConfig, TxlForSequenceClassification, exist_ok=True)

# `save_pretrained` then writes `auto_map` into config.json and copies configuration_txl.py, modeling_txl.py and the
# siblings it imports (cache_txl.py, adaptive_txl.py, kernels_txl.py) next to the weights, so the directory also loads
# with `trust_remote_code=True` where hf_txl is not installed.
TxlConfig.register_for_auto_class()
TxlModel.register_for_auto_class("AutoModel")
TxlForCausalLM.register_for_auto_class("AutoModelForCausalLM")
TxlForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"

__all__ = [
    "TxlCache",
    "TxlConfig",
    "TxlForCausalLM",
    "TxlForSequenceClassification",
    "TxlMems",
    "TxlModel",
    "TxlPreTrainedModel",
]

# --- tokenizer and data pipeline exports (tokenization_txl.py, data.py) ---
from .tokenization_txl import (  # noqa: E402
    TxlCharTokenizer,
    TxlWordTokenizer,
    UnknownCharacterWarning,
    build_tokenizer,
    token_unit,
)
from .training.overrides import parse_config_overrides  # noqa: E402

__all__ += [
    "DEFAULT_CORPUS_PATH",
    "StreamBatcher",
    "TxlCharTokenizer",
    "TxlWordTokenizer",
    "UnknownCharacterWarning",
    "build_tokenizer",
    "load_corpus",
    "parse_config_overrides",
    "token_unit",
    "tokenize_to_array",
]

# --- legacy transformers 4.x `transfo-xl` checkpoints (legacy.py) ---
from .legacy import TxlLegacyConfig, TxlLegacyForCausalLM, TxlLegacyModel  # noqa: E402
from .modeling_txl import TxlAdaptiveEmbedding, TxlAdaptiveLogSoftmax  # noqa: E402

AutoConfig.register(TxlLegacyConfig.model_type, TxlLegacyConfig, exist_ok=True)
AutoModel.register(TxlLegacyConfig, TxlLegacyModel, exist_ok=True)
AutoModelForCausalLM.register(TxlLegacyConfig, TxlLegacyForCausalLM, exist_ok=True)

__all__ += [
    "TxlAdaptiveEmbedding",
    "TxlAdaptiveLogSoftmax",
    "TxlLegacyConfig",
    "TxlLegacyForCausalLM",
    "TxlLegacyModel",
]

# The data pipeline (data.py) imports datasets, pyarrow and pandas: loaded on first use, so that using the model
# alone does not pay for them (about 0.7 s and 95 MiB at import).
# transformers' Trainer with the memory carried (training/trainer.py) loads with it too.
_LAZY_DATA_NAMES = ("DEFAULT_CORPUS_PATH", "StreamBatcher", "load_corpus", "tokenize_to_array")
_LAZY_TRAINER_NAMES = ("TxlStreamDataset", "TxlTrainer")
__all__ += list(_LAZY_TRAINER_NAMES)


def __getattr__(name: str):
    if name in _LAZY_DATA_NAMES:
        from .training import data

        return getattr(data, name)
    if name in _LAZY_TRAINER_NAMES:
        from .training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_DATA_NAMES) | set(_LAZY_TRAINER_NAMES))
