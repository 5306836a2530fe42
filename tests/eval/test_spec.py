"""Settings from shorthand, JSON and dicts: what ``accel eval`` compares, checked before any model loads."""
from __future__ import annotations

import json

import pytest

import accel
from accel.eval.spec import UNPATCHED, Setting, parse_setting, parse_settings
from tests.conftest import ROOT

EXITS = ROOT / "assets" / "fashion-vit-exits"  # the shipped early-exit heads: a real folder shorthand


# -- shorthand ------------------------------------------------------------------------------------
def test_shorthand_values_read_as_json():
    assert parse_setting("tome=0.5") == Setting("tome=0.5", {"tome": 0.5})
    assert parse_setting("tome=2").methods == {"tome": 2}
    assert isinstance(parse_setting("tome=2").methods["tome"], int)


def test_shorthand_several_methods_in_order():
    setting = parse_setting("tome=0.5,deepcache=3")
    assert setting.methods == {"tome": 0.5, "deepcache": 3}
    assert list(setting.methods) == ["tome", "deepcache"]
    assert setting.label == "tome=0.5,deepcache=3"
    assert setting.names == "tome+deepcache"


def test_shorthand_list_keeps_its_commas():
    setting = parse_setting("tome=[2,3]")
    assert setting.methods == {"tome": [2, 3]}
    both = parse_setting("tome=[2,3],deepcache=3")
    assert both.methods == {"tome": [2, 3], "deepcache": 3}


def test_shorthand_path_stays_a_string():
    setting = parse_setting(f"early_exit={EXITS}")
    assert setting.methods == {"early_exit": str(EXITS)}
    assert isinstance(setting.methods["early_exit"], str)
    assert setting.as_record()["methods"] == {"early_exit": str(EXITS)}


def test_shorthand_spaces_are_trimmed():
    assert parse_setting("  tome = 2 , deepcache = 3 ").methods == {"tome": 2, "deepcache": 3}


# -- JSON and dicts -------------------------------------------------------------------------------
def test_json_keeps_the_dict_and_labels_compactly():
    setting = parse_setting('{"tome": {"mode": "downsample"}}')
    assert setting.methods == {"tome": {"mode": "downsample"}}
    assert setting.label == '{"tome":{"mode":"downsample"}}'
    assert json.loads(setting.label) == setting.methods


def test_dict_input():
    setting = parse_setting({"tome": 2, "deepcache": {"interval": 3}})
    assert setting.methods == {"tome": 2, "deepcache": {"interval": 3}}
    assert setting.label == 'tome=2,deepcache={"interval": 3}'


def test_setting_input_is_checked_again():
    assert parse_setting(Setting("mine", {"tome": 2})) == Setting("mine", {"tome": 2})
    with pytest.raises(ValueError, match="'mine'"):
        parse_setting(Setting("mine", {"tome": -1}))


@pytest.mark.parametrize("text", ["unpatched", "", "  ", {}])
def test_baseline(text):
    setting = parse_setting(text)
    assert setting.label == UNPATCHED and setting.methods == {}
    assert setting.names == "-"


# -- parse_settings -------------------------------------------------------------------------------
def test_baseline_first_exactly_once():
    labels = [s.label for s in parse_settings(["tome=2", "deepcache=3"])]
    assert labels == [UNPATCHED, "tome=2", "deepcache=3"]
    given = [s.label for s in parse_settings(["tome=2", "unpatched"])]
    assert given == ["tome=2", UNPATCHED]  # where the caller put it, not twice
    assert [s.label for s in parse_settings(["tome=2"], baseline=False)] == ["tome=2"]


def test_duplicate_labels_refused():
    with pytest.raises(ValueError, match="tome=2 given more than once"):
        parse_settings(["tome=2", "tome=2"])
    with pytest.raises(ValueError, match="unpatched"):
        parse_settings(["unpatched", ""])


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError) as caught:
        parse_setting("tomee=2")
    message = str(caught.value)
    assert "'tomee=2'" in message and "unknown method 'tomee'" in message
    for name in accel.available_methods():
        assert name in message


def test_unknown_method_in_json():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_setting('{"nope": 1}')


def test_malformed_json():
    with pytest.raises(ValueError, match="malformed JSON") as caught:
        parse_setting('{"tome": 2')
    assert '{"tome": 2' in str(caught.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"tome"', "3"])
def test_json_that_is_not_an_object(text):
    # only text starting with "{" is read as JSON; anything else must be method=value shorthand
    with pytest.raises(ValueError, match="expected method=value") as caught:
        parse_setting(text)
    assert "JSON" in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["tome", "tome=", "=2", "tome=2,", "tome=2,deepcache"])
def test_missing_equals_or_value(text):
    with pytest.raises(ValueError, match="expected method=value") as caught:
        parse_setting(text)
    assert repr(text) in str(caught.value)


def test_method_given_twice():
    with pytest.raises(ValueError, match="'tome' given twice in 'tome=2,tome=3'"):
        parse_setting("tome=2,tome=3")


@pytest.mark.parametrize("text, error", [
    ("deepcache=0", ValueError),      # DeepCache: interval must be an int >= 1
    ("deepcache=abc", TypeError),     # not an int interval nor a dict
    ("tome=-1", ValueError),          # ToMe: r must be >= 0
    ("evit=2", ValueError),           # EViT: keep_rate in (0, 1]
    ('{"deepcache": {"interval": 2, "bogus": 1}}', ValueError),  # unknown key of the config
])
def test_bad_value_names_the_setting(text, error):
    with pytest.raises(error) as caught:
        parse_setting(text)
    assert repr(text) in str(caught.value)


def test_bad_value_message_says_what_is_wrong():
    with pytest.raises(ValueError, match="interval"):
        parse_setting("deepcache=0")
    with pytest.raises(ValueError, match="bogus"):
        parse_setting('{"deepcache": {"bogus": 1}}')


def test_path_that_does_not_load_is_a_value_error(tmp_path):
    # a missing heads folder is a bad value, not a traceback out of the CLI (which catches ValueError)
    missing = tmp_path / "no-heads"
    with pytest.raises(ValueError, match="early_exit=") as caught:
        parse_setting(f"early_exit={missing}")
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("value", [3, 0.5, ["tome=2"], None, ("tome", 2)])
def test_other_input_types_refused(value):
    with pytest.raises(TypeError, match="expected shorthand text, JSON text or a dict"):
        parse_setting(value)


# -- records --------------------------------------------------------------------------------------
def test_as_record_of_a_config_object_is_json():
    setting = parse_setting({"tome": accel.ToMe(r=2), "deepcache": accel.DeepCache(interval=3)})
    record = setting.as_record()
    again = json.loads(json.dumps(record))
    assert again == record
    assert record["label"] == setting.label
    assert record["methods"]["tome"]["r"] == 2
    assert record["methods"]["deepcache"]["interval"] == 3
    assert record["methods"]["deepcache"]["schedule"] == "uniform"


def test_as_record_of_shorthand():
    record = parse_setting("tome=[2,3],deepcache=3").as_record()
    assert record == {"label": "tome=[2,3],deepcache=3", "methods": {"tome": [2, 3], "deepcache": 3}}
    assert json.loads(json.dumps(record)) == record
