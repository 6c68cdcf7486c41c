"""TxlConfig: a transformers v5 ``@strict`` config. Defaults, aliases, validation, serialisation, old files."""

import ast
import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError

from hf_txl import TxlConfig

CONFIG_FILE = Path(__file__).resolve().parent.parent / "hf_txl" / "configuration_txl.py"

# The paper's enwik8 base model (Dai et al. 2019, table 8 / the original run_enwik8_base.sh), 204 byte symbols.
ENWIK8_BASE = dict(
    vocab_size=204, d_model=512, n_layer=12, n_head=8, d_head=64, d_inner=2048, dropout=0.1, dropatt=0.0,
    mem_len=512, clamp_len=-1, same_length=False, pre_lnorm=False, untie_r=True, tie_word_embeddings=True,
    use_cache=True, layer_norm_epsilon=1e-5, init_std=0.02, cutoffs=[], div_val=1, d_embed=None,
    proj_share_all_but_first=False, legacy_zero_mems=False,
)  # fmt: skip


def names_field(field):
    """Error messages quote the field in backticks (`mem_len` or `same_length=True`)."""
    return re.escape(f"`{field}")


def test_defaults_are_the_papers_enwik8_base_model():
    config = TxlConfig()
    assert {name: getattr(config, name) for name in ENWIK8_BASE} == ENWIK8_BASE
    assert config.model_type == "hf_txl"
    assert config.embed_dim() == 512 and not config.uses_adaptive()
    assert config.keys_to_ignore_at_inference == ["cache", "mems"]


def test_fields_are_declared_with_the_papers_names():
    declared = {f.name: f for f in dataclasses.fields(TxlConfig)}
    assert set(ENWIK8_BASE) <= set(declared)
    assert declared["use_cache"].type is bool and declared["tie_word_embeddings"].type is bool


@pytest.mark.parametrize(
    "alias,field,value",
    [("hidden_size", "d_model", 64), ("num_hidden_layers", "n_layer", 3), ("num_attention_heads", "n_head", 2),
     ("n_token", "vocab_size", 99)],
)  # fmt: skip
def test_aliases_read_and_write_the_papers_fields(alias, field, value):
    config = TxlConfig()
    assert getattr(config, alias) == getattr(config, field)
    setattr(config, alias, value)
    assert getattr(config, field) == value and getattr(config, alias) == value
    assert getattr(TxlConfig(**{alias: value}), field) == value
    assert alias not in config.to_dict()


def test_writing_through_an_alias_is_validated_as_the_field():
    config = TxlConfig()
    with pytest.raises(ValueError, match=names_field("d_model")):
        config.hidden_size = 0
    with pytest.raises(ValueError, match=names_field("n_layer")):
        config.num_hidden_layers = True
    with pytest.raises(ValueError, match=names_field("vocab_size")):
        TxlConfig(n_token=0)
    assert config.d_model == 512 and config.n_layer == 12


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0), ("vocab_size", True), ("d_model", -4), ("d_model", 512.0), ("n_layer", 0),
        ("n_layer", True), ("n_head", 1.5), ("n_head", False), ("d_head", 0), ("d_inner", None), ("d_inner", "2048"),
        ("dropout", 1.0), ("dropout", -0.1), ("dropout", True), ("dropout", float("nan")), ("dropatt", 1.5),
        ("dropatt", None), ("mem_len", -1), ("mem_len", 16.0), ("mem_len", False), ("clamp_len", -2),
        ("clamp_len", 2.5), ("layer_norm_epsilon", 0), ("layer_norm_epsilon", -1e-5), ("layer_norm_epsilon", True),
        ("init_std", -1.0), ("init_std", 0.0), ("div_val", 0), ("div_val", 2.0), ("div_val", True), ("d_embed", 0),
        ("d_embed", 16.0), ("d_embed", True), ("cutoffs", None), ("cutoffs", (10, 30)), ("cutoffs", [10.0, 30]),
        ("cutoffs", [10, True]), ("same_length", 1), ("pre_lnorm", "no"), ("untie_r", None),
        ("tie_word_embeddings", 0), ("use_cache", "yes"), ("proj_share_all_but_first", 1), ("legacy_zero_mems", 1),
    ],
)  # fmt: skip
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=names_field(field)) as error:
        TxlConfig(**{field: value})
    assert "must be" in str(error.value)  # and says what the field must be


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(same_length=True, mem_len=0), "same_length"),
        (dict(cutoffs=[30, 10]), "cutoffs"),
        (dict(cutoffs=[10, 10]), "cutoffs"),
        (dict(cutoffs=[0, 10]), "cutoffs"),
        (dict(cutoffs=[-5]), "cutoffs"),
        (dict(cutoffs=[10, 204]), "cutoffs"),
        (dict(vocab_size=100, cutoffs=[10, 150]), "cutoffs"),
        (dict(cutoffs=[10, 30, 40], div_val=4, d_embed=16), "div_val"),
        (dict(cutoffs=[10, 30], div_val=32, d_embed=512), "div_val"),
        (dict(cutoffs=[10], div_val=2, d_model=1, d_embed=None), "div_val"),
    ],
)
def test_inconsistent_fields_raise_value_error_naming_them(fields, field):
    with pytest.raises(ValueError, match=names_field(field)):
        TxlConfig(**fields)


def test_errors_are_value_errors_and_strict_dataclass_errors():
    for fields in (dict(n_layer=0), dict(same_length=True, mem_len=0)):
        with pytest.raises(ValueError) as error:
            TxlConfig(**fields)
        assert isinstance(error.value, StrictDataclassError)


def test_ints_are_accepted_for_float_fields():
    config = TxlConfig(dropout=0, dropatt=0, layer_norm_epsilon=1, init_std=1)
    assert (config.dropout, config.layer_norm_epsilon) == (0, 1)


def test_assignment_is_validated_and_leaves_the_value_unchanged():
    config = TxlConfig()
    with pytest.raises(ValueError, match=names_field("mem_len")):
        config.mem_len = -1
    with pytest.raises(ValueError, match=names_field("n_layer")):
        config.n_layer = True
    assert config.mem_len == 512 and config.n_layer == 12
    config.validate_txl()


def test_validate_txl_rechecks_a_mutated_config():
    config = TxlConfig()
    object.__setattr__(config, "mem_len", -1)  # bypasses the assignment check
    with pytest.raises(ValueError, match=names_field("mem_len")):
        config.validate_txl()

    config = TxlConfig(vocab_size=100)
    config.cutoffs.append(100)  # in place: no assignment
    with pytest.raises(ValueError, match=names_field("cutoffs")):
        config.validate_txl()

    config = TxlConfig()
    config.same_length = True
    config.mem_len = 0  # each assignment is valid on its own
    with pytest.raises(ValueError, match=names_field("same_length")):
        config.validate_txl()


def test_save_pretrained_refuses_an_inconsistent_config(tmp_path):
    config = TxlConfig(same_length=True)
    config.mem_len = 0
    with pytest.raises(ValueError, match=names_field("same_length")):
        config.save_pretrained(tmp_path)


def test_deepcopy_then_mutate():
    config = TxlConfig(cutoffs=[10, 30], vocab_size=100)
    clone = copy.deepcopy(config)
    clone.mem_len = 0
    clone.cutoffs.append(50)
    clone.validate_txl()
    assert (config.mem_len, config.cutoffs) == (512, [10, 30])
    assert (clone.mem_len, clone.cutoffs) == (0, [10, 30, 50])


def test_cutoffs_are_copied_from_the_callers_list():
    cutoffs = [10, 30]
    config = TxlConfig(vocab_size=100, cutoffs=cutoffs)
    cutoffs.append(50)
    assert config.cutoffs == [10, 30]


def test_save_load_round_trip(tmp_path):
    config = TxlConfig(
        vocab_size=100, cutoffs=[10, 30], div_val=2, d_embed=32, d_model=16, n_layer=2, n_head=2, d_head=8,
        d_inner=32, mem_len=0, use_cache=False, tie_word_embeddings=False, proj_share_all_but_first=True,
    )  # fmt: skip
    assert config.uses_adaptive() and config.embed_dim() == 32
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["cutoffs"] == [10, 30] and saved["use_cache"] is False and saved["tie_word_embeddings"] is False
    loaded = TxlConfig.from_pretrained(tmp_path)
    assert type(loaded) is TxlConfig and loaded.to_dict() == config.to_dict()
    assert TxlConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert json.loads(config.to_json_string(use_diff=False))["cutoffs"] == [10, 30]


def old_config_json() -> dict:
    """A config.json as written by earlier hf_txl versions (no `use_cache`), plus a key nobody knows."""
    return {
        "architectures": ["TxlForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_txl.TxlConfig", "AutoModel": "modeling_txl.TxlModel"},
        "clamp_len": -1, "cutoffs": [], "d_embed": None, "d_head": 8, "d_inner": 64, "d_model": 32, "div_val": 1,
        "dropatt": 0.0, "dropout": 0.0, "dtype": "float32", "init_std": 0.02, "layer_norm_epsilon": 1e-05,
        "legacy_zero_mems": False, "mem_len": 16, "model_type": "hf_txl", "n_head": 4, "n_layer": 2, "pad_token_id": 0,
        "pre_lnorm": False, "proj_share_all_but_first": False, "same_length": False, "tie_word_embeddings": True,
        "transformers_version": "5.0.0", "untie_r": True, "vocab_size": 40, "some_future_field": [1, 2],
    }  # fmt: skip


def test_old_config_json_with_an_unknown_key_loads(tmp_path):
    config = TxlConfig.from_dict(old_config_json())
    assert (config.d_model, config.mem_len, config.cutoffs, config.d_embed) == (32, 16, [], None)
    assert config.use_cache is True and config.some_future_field == [1, 2] and config.pad_token_id == 0

    (tmp_path / "config.json").write_text(json.dumps(old_config_json()))
    loaded = TxlConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_use_cache_and_tie_word_embeddings_are_declared_fields():
    defaults = TxlConfig().to_dict()
    assert defaults["use_cache"] is True and defaults["tie_word_embeddings"] is True
    config = TxlConfig(use_cache=False, tie_word_embeddings=False)
    assert config.use_cache is False and config.tie_word_embeddings is False
    assert config.to_dict()["use_cache"] is False and config.to_dict()["tie_word_embeddings"] is False


def test_embed_dim_and_uses_adaptive():
    assert TxlConfig(d_embed=64).embed_dim() == 64 and TxlConfig(d_embed=64).uses_adaptive()
    assert TxlConfig(d_embed=512).embed_dim() == 512 and not TxlConfig(d_embed=512).uses_adaptive()
    assert TxlConfig(div_val=2).uses_adaptive() and TxlConfig(cutoffs=[100]).uses_adaptive()


def test_configuration_file_is_standalone():
    """Shipped next to the weights for trust_remote_code users: only transformers, huggingface_hub and stdlib."""
    tree = ast.parse(CONFIG_FILE.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert {m.split(".")[0] for m in modules} <= {"transformers", "huggingface_hub", "dataclasses", "typing"}
    assert "__future__" not in modules  # string annotations would switch @strict's type checks off
