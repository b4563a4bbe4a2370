"""Recipes: packaged ones validate, overrides are typed, mistakes name the key and the fix."""

import pytest

from compress.errors import UserError
from compress.recipe import load_recipe, packaged_recipes


@pytest.mark.parametrize("name", packaged_recipes())
def test_packaged_recipes_validate(name):
    recipe = load_recipe(name, ["model=some/model", "output=out"])
    assert recipe.stages and recipe.export.output == "out"


def test_overrides_are_typed_and_follow_paths():
    recipe = load_recipe("flap_20", ["stages.0.sparsity=0.35", "calibration.num_samples=16", "ppl=full",
                                     "stages.0.uniform=true", "overwrite=true", "eval.ppl=7"])
    stage = recipe.stages[0]
    assert stage.sparsity == 0.35 and stage.uniform is True
    assert recipe.calibration.num_samples == 16
    assert recipe.export.overwrite is True
    assert recipe.eval.ppl == 7


def test_short_aliases():
    recipe = load_recipe("flap_20", ["model=smollm2-135m", "output=o", "calibration=self", "sparsity=0.5"])
    assert recipe.model.name == "smollm2-135m"
    assert recipe.calibration.source == "self"
    assert recipe.stages[0].sparsity == 0.5
    recipe = load_recipe("flap_20", ["calibration=data/my.txt"])
    assert recipe.calibration.source == "text" and recipe.calibration.path == "data/my.txt"


def test_whole_section_replaced_by_yaml_value():
    recipe = load_recipe("flap_20", ['stages=[{method: wanda_sp, sparsity: 0.1}]'])
    assert recipe.stages[0].method == "wanda_sp"


@pytest.mark.parametrize("override,message", [
    ("stages.0.sparsty=0.3", "did you mean 'stages.0.sparsity'"),
    ("calibraton.seed=1", "did you mean 'calibration'"),
    ("uniform=true", "did you mean 'stages.0.uniform'"),
    ("stages.0.sparsity=1.0", "stages.0.sparsity': Input should be less than 1"),
    ("stages.0.sparsity=-0.1", "greater than or equal to 0"),
    ("stages.0.metric=XYZ", "stages.0.metric"),
    ("stages.0.method=flop", "did you mean 'flap'"),
    ("calibration.num_samples=many", "calibration.num_samples"),
    ("stages.3.sparsity=0.1", "index 3 out of range"),
    ("eval.ppl=0", "eval.ppl"),
])
def test_mistakes_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("'", "'")):
        load_recipe("flap_20", [override])


def test_unknown_recipe_name_suggests():
    with pytest.raises(UserError, match="did you mean 'flap_20'"):
        load_recipe("flap_2O")


def test_yaml_is_safe_loaded(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['echo hacked']\nstages: [{method: flap}]\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))
