"""Recipe schema: every shipped recipe parses; bad recipes fail with messages that name the problem."""

from __future__ import annotations

import pytest

from longtune.train.recipe import (
    RECIPES_DIR,
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    shipped_recipes,
)


def test_recipes_are_shipped():
    assert "tiny-smoke" in shipped_recipes()


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_parses(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    # The resolved form round-trips through YAML into the same recipe.
    import yaml

    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"train": {"max_step": 3}})
    msg = str(err.value)
    assert "train.max_step" in msg and "did you mean 'max_steps'" in msg and "seq_len" in msg


def test_unknown_section():
    with pytest.raises(RecipeError, match="unknown key 'trian'.*valid keys here: model, extension"):
        recipe_from_dict({"trian": {}})


def test_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"train\.max_steps.*got 'ten'"):
        recipe_from_dict({"train": {"max_steps": "ten"}})
    with pytest.raises(RecipeError, match=r"parallel\.backend"):
        recipe_from_dict({"parallel": {"backend": "megatron"}})


def test_dotted_overrides_are_typed_yaml():
    recipe = load_recipe("tiny-smoke", ["train.max_steps=7", "parallel.backend=deepspeed",
                                        "parallel.deepspeed.zero_stage=3", "train.lr=1e-4"])
    assert recipe.train.max_steps == 7
    assert recipe.parallel.backend == "deepspeed" and recipe.parallel.deepspeed.zero_stage == 3
    assert recipe.train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train..x=1"])
def test_malformed_override(bad):
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, [bad])


def test_override_into_a_scalar_is_refused():
    with pytest.raises(RecipeError, match="train.seq_len is not a section"):
        apply_overrides({"train": {"seq_len": 4}}, ["train.seq_len.x=1"])


def test_cross_field_checks():
    with pytest.raises(RecipeError, match=r"global_batch_size 6 is not divisible by parallel.dp × "
                                          r"train.micro_batch_size \(= 2 × 4 = 8\)"):
        recipe_from_dict({"parallel": {"dp": 2}, "train": {"global_batch_size": 6, "micro_batch_size": 4}})
    with pytest.raises(RecipeError, match="need parallel.fsdp=true"):
        recipe_from_dict({"memory": {"offload": {"optimizer": True}}})
    with pytest.raises(RecipeError, match="zero_stage=3, got 2"):
        recipe_from_dict({"parallel": {"backend": "deepspeed"}, "memory": {"offload": {"params": True}}})
    with pytest.raises(RecipeError, match="needs extension.target_length or extension.factor"):
        recipe_from_dict({"extension": {"method": "yarn"}})


def test_capabilities_not_built_yet_are_refused_by_name():
    with pytest.raises(RecipeError, match="memory.recompute_modules is for memory.recompute=selective or full"):
        recipe_from_dict({"memory": {"recompute_modules": ["mlp"]}})
    with pytest.raises(RecipeError, match=r"^recipe: memory.tiled_mlp with parallel.tp > 1: not available yet"):
        recipe_from_dict({"parallel": {"tp": 2}, "memory": {"tiled_mlp": True}})
    assert recipe_from_dict({"parallel": {"pp": 2, "tp": 2}}).parallel.model_parallel_size == 4
    assert recipe_from_dict({"parallel": {"sp": {"ring": 2, "ulysses": 2}}}).parallel.sp.degree == 4


@pytest.mark.parametrize("offload,parallel,message", [
    ({"tier": "disk"}, {}, "memory.offload.tier=disk is where offload.checkpoints, offload.gradients and"),
    ({"dir": "/tmp/x", "optimizer_swap": True}, {}, "memory.offload.dir is for memory.offload.tier=disk"),
    ({"optimizer_swap": True}, {"fsdp": True}, "optimizer_swap is for parallel.backend=native without FSDP2"),
    ({"optimizer_swap": True}, {"backend": "deepspeed"}, "optimizer_swap is for parallel.backend=native"),
    ({"gradients": True}, {"sp": {"ulysses": 2}, "fsdp": True},
     "memory.offload.gradients is for one process with parallel.backend=native .*got parallel.fsdp, parallel.sp > 1"),
    ({"gradients": True}, {"dp": 2}, "memory.offload.gradients is for one process .*got parallel.dp > 1$"),
    ({"gradients": True}, {"backend": "deepspeed"}, "got parallel.backend=deepspeed$"),
])
def test_offload_tier_and_optimizer_swap_are_checked(offload, parallel, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"memory": {"offload": offload}, "parallel": parallel})
    ok = recipe_from_dict({"memory": {"offload": {"optimizer_swap": True, "tier": "disk", "dir": "/tmp/x"}}})
    assert ok.memory.offload.tier == "disk"
    ok = recipe_from_dict({"memory": {"offload": {"gradients": True, "tier": "disk"}}})
    assert ok.memory.offload.gradients and ok.memory.offload.tier == "disk"


def test_world_size_checks_name_the_numbers():
    recipe = recipe_from_dict({"parallel": {"dp": 2}})
    assert recipe.data_parallel_size(2) == 2
    with pytest.raises(RecipeError, match=r"world size 3 does not match parallel.dp 2"):
        recipe.data_parallel_size(3)
    free = recipe_from_dict({"train": {"global_batch_size": 4, "micro_batch_size": 1}})
    assert free.data_parallel_size(4) == 4
    with pytest.raises(RecipeError, match="global_batch_size 4 is not divisible by dp × "):
        free.data_parallel_size(3)


def test_missing_recipe():
    with pytest.raises(RecipeError, match="neither a file nor a shipped recipe.*tiny-smoke"):
        load_recipe("no-such-recipe")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 3\n")
    with pytest.raises(RecipeError, match="cannot read it as YAML"):
        load_recipe(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(str(bad))


def test_recipes_dir_is_the_checkout_or_package():
    assert (RECIPES_DIR / "tiny-smoke.yaml").is_file()
