"""parse_config_overrides: bracket-aware splitting, JSON values, and errors that name the item and the fix."""

import pytest

from hf_txl import TxlConfig
from hf_txl.training.overrides import parse_config_overrides, split_items

FIELDS = ["cutoffs", "div_val", "pre_lnorm", "init", "dropout", "d_embed", "n_layer", "name", "extra"]


def test_typical_string():
    text = "cutoffs=[20000,40000,200000],div_val=1,pre_lnorm=true,init=normal,dropout=0.2"
    assert parse_config_overrides(text, FIELDS) == {
        "cutoffs": [20000, 40000, 200000], "div_val": 1, "pre_lnorm": True, "init": "normal", "dropout": 0.2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3), ("-1", -1), ("2.5e-4", 2.5e-4), ("true", True), ("False", False), ("null", None), ("None", None),
        ("[]", []), ("[1, 2.5, true]", [1, 2.5, True]), ('{"a": [1, 2]}', {"a": [1, 2]}),
        ('"quoted, text"', "quoted, text"), ("normal", "normal"), ("1e", "1e"), ("a b", "a b"),
    ],
)  # fmt: skip
def test_values_are_json_literals_else_strings(value, expected):
    result = parse_config_overrides(f"name={value}", FIELDS)["name"]
    assert result == expected and type(result) is type(expected)


def test_empty_input_whitespace_and_trailing_commas():
    assert parse_config_overrides(None, FIELDS) == {}
    assert parse_config_overrides("  ", FIELDS) == {}
    assert parse_config_overrides(" n_layer = 6 , dropout=0.1, ", FIELDS) == {"n_layer": 6, "dropout": 0.1}


def test_commas_inside_brackets_and_quotes_do_not_split():
    assert split_items('a=[1,[2,3]],b={"x":1,"y":2},c="p,q\\",r",d=4') == [
        "a=[1,[2,3]]", 'b={"x":1,"y":2}', 'c="p,q\\",r"', "d=4",
    ]  # fmt: skip
    assert parse_config_overrides("cutoffs=[ 2000 , 6000 ],extra=x=y", FIELDS) == {
        "cutoffs": [2000, 6000], "extra": "x=y",  # only the first '=' separates
    }  # fmt: skip


def test_works_with_the_txl_config_fields():
    fields = TxlConfig().to_dict()
    overrides = parse_config_overrides("cutoffs=[20,40],div_val=2,d_embed=null,pre_lnorm=true", fields)
    config = TxlConfig(vocab_size=100, **overrides)
    assert (config.cutoffs, config.div_val, config.d_embed, config.pre_lnorm) == ([20, 40], 2, None, True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("n_layer=6,dropout", r"'dropout' is not key=value; write e\.g\. dropout=0\.2"),
        ("=3", r"'=3' is not key=value"),
        ("n_layer=", r"'n_layer=' has no value after '='; write e\.g\. n_layer="),
        ("n_layers=6", r"unknown field 'n_layers' in 'n_layers=6'; did you mean 'n_layer'\?"),
        ("cutofs=[1]", r"did you mean 'cutoffs'\?"),
        ("zzzz=1", r"unknown field 'zzzz'.*known fields: cutoffs, d_embed, div_val"),
        ("n_layer=6,dropout=0.1,n_layer=8", r"'n_layer' is given twice \('n_layer=8' repeats it\); keep one"),
        ("cutoffs=[1,2,div_val=1", r"unclosed '\[' in 'cutoffs=\[1,2,div_val=1'; add '\]'"),
        ("cutoffs=[[1,2,div_val=1", r"add '\]\]'"),
        ("cutoffs=1,2],div_val=1", r"unbalanced '\]' in '2\]': it closes no open bracket"),
        ("cutoffs=[1,2},div_val=1", r"unbalanced '\}' in 'cutoffs=\[1,2\}'"),
        ("a=1]", r"unbalanced '\]' in 'a=1\]'.*add the matching opening bracket"),
        ('name="abc,div_val=1', r"unclosed '\"' in 'name=\"abc,div_val=1'"),
        ("cutoffs=[1,,2]", r"'cutoffs=\[1,,2\]': '\[1,,2\]' is not valid JSON"),
        ("cutoffs=[a,b]", r"is not valid JSON"),
    ],
)  # fmt: skip
def test_errors_name_the_item_and_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        parse_config_overrides(text, FIELDS)
