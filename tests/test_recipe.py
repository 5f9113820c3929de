import json

import pytest

from slimlm.compress import Recipe
from slimlm.errors import SlimlmError

CASES = [
    "none",
    "rtn:bits=4,group=64",
    "rtn:bits=4,group=0,sym=true",
    "rtn:bits=3,group=64+rtn:bits=8,group=64@*.down_proj",
    "rtn:bits=2,group=32@model.layers.0.*|*.o_proj+rtn:bits=6,group=96@*.q_proj",
]


@pytest.mark.parametrize("text", CASES)
def test_round_trips_exactly(text, tmp_path):
    r = Recipe.parse(text)
    assert r.to_string() == text
    assert Recipe.parse(r.to_string()) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    f = tmp_path / "r.yaml"
    f.write_text(r.to_yaml())
    assert Recipe.load(str(f)) == r
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r.to_dict()))
    assert Recipe.load(str(f)) == r


def test_one_line_form_is_canonicalised():
    r = Recipe.parse(" rtn : bits = 4 , group=channel ")
    assert r.to_string() == "rtn:bits=4,group=0"
    assert r.stages[0].config.group == 0


def test_patterns_and_last_stage_of_a_kind_wins():
    r = Recipe.parse("rtn:bits=3,group=64+rtn:bits=8,group=64@*.down_proj")
    down = r.stages_for("model.layers.4.mlp.down_proj")
    up = r.stages_for("model.layers.4.mlp.up_proj")
    assert [s.config.bits for s in down] == [8]
    assert [s.config.bits for s in up] == [3]
    assert Recipe.parse("rtn:bits=4@*.q_proj").stages_for("model.layers.0.mlp.up_proj") == []


def test_only_explicit_patterns_name_the_head():
    blocks, with_head = "rtn:bits=4,group=16", "rtn:bits=4,group=16+rtn:bits=6,group=16@lm_head"
    assert [s.config.bits for s in Recipe.parse(with_head).stages_for("model.layers.0.mlp.up_proj")] == [4]
    assert Recipe.parse(blocks).stages_for("lm_head", explicit=True) == []
    assert [s.config.bits for s in Recipe.parse(with_head).stages_for("lm_head", explicit=True)] == [6]
    assert len(Recipe.parse("rtn:bits=4,group=16@*").stages_for("lm_head", explicit=True)) == 1
    assert Recipe.parse("rtn:bits=4,group=16@*.down_proj").stages_for("lm_head", explicit=True) == []
    assert Recipe.parse(with_head).to_string() == with_head


@pytest.mark.parametrize("text, msg", [
    ("", "empty"),
    ("nosuch:bits=4", "unknown method 'nosuch'"),
    ("rtn:bitz=4", "unknown option 'bitz'"),
    ("rtn:bits=four", "not a valid int"),
    ("rtn:bits=9", "bits must be in 2..8"),
    ("rtn:bits=1", "bits must be in 2..8"),
    ("rtn:group=-3", "group"),
    ("rtn:bits", "not key=value"),
    ("rtn:sym=maybe", "not a valid bool"),
    (":bits=4", "names no method"),
])
def test_bad_recipes_say_what_is_wrong(text, msg):
    with pytest.raises(SlimlmError, match=msg):
        Recipe.parse(text)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(SlimlmError, match="no such file"):
        Recipe.load(str(tmp_path / "missing.yaml"))
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(SlimlmError, match="could not be parsed"):
        Recipe.load(str(f))
    f.write_text(json.dumps({"stages": [{"method": "rtn", "bits": 4}]}))
    with pytest.raises(SlimlmError, match="unknown keys"):
        Recipe.load(str(f))
