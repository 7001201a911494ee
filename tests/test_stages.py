"""Progressive stages: declared in the recipe, validated like it, each stage trained from the previous
stage's export with its rope computed from the base model, gated, skipped once complete, resumed when not."""

from __future__ import annotations

import json

import pytest

from conftest import longtune, metrics
from longtune.train.recipe import RecipeError, load_recipe, recipe_from_dict
from longtune.train.schedule import LRSchedule
from longtune.train.stages import STAGE_FILE, StageError, recipe_digest, run_stages

BASE = {"extension": {"method": "linear", "target_length": 512}, "train": {"seq_len": 256, "output_dir": "out"}}


def test_stage_recipes_are_the_recipe_with_the_stage_keys():
    recipe = load_recipe("tiny-progressive", ["stages.1.train.max_steps=3"])
    first, second = recipe.stage_recipe(0), recipe.stage_recipe(1)
    assert (first.train.seq_len, first.extension.target_length, first.train.max_steps) == (512, 512, 10)
    assert (second.train.seq_len, second.extension.target_length, second.train.max_steps) == (1024, 1024, 3)
    assert second.train.output_dir.endswith("tiny-progressive/ctx1024") and second.train.lr == recipe.train.lr
    assert recipe.stages[1].gate.perplexity_below == 1500.0 and not recipe.stages[0].gate.enabled


@pytest.mark.parametrize("stages,match", [
    ([{"max_steps": 3}], r"stages\.0: unknown key 'max_steps'; a stage holds name, gate and recipe keys"),
    ([{"train.max_step": 3}], r"stages\.0 \(stage1\): unknown key 'train.max_step' \(did you mean 'max_steps'"),
    ([{"trian": {"max_steps": 3}}], r"stages\.0: unknown key 'trian'"),
    ([{"gate": {"perplexity_belo": 3}}], r"unknown key 'stages.0.gate.perplexity_belo' \(did you mean"),
    ([{"train.output_dir": "x"}], r"train.output_dir is set by the stage runner"),
    ([{"model.name_or_path": "x"}], r"model.name_or_path is set by the stage runner"),
    ([{"name": "a"}, {"name": "a"}], r"stages\.1: name 'a' is also the name of stages\.0"),
    ([{"train.export": False}], r"train.export=false, but the next stage"),
    ([{}, {"parallel.sp.ring": 2}], r"stages\.1 \(stage2\) runs on 2 processes, stages\.0 on 1"),
    ([{"train.seq_len": 300, "parallel.sp.ring": 2, "parallel.dp": 1, "train.global_batch_size": 3,
       "parallel.deepspeed.zero_stage": 5}], r"stages\.0 \(stage1\): parallel.deepspeed.zero_stage"),
])
def test_bad_stages_are_refused_by_name(stages, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict({**BASE, "stages": stages})


def test_linear_schedule_decays_to_the_floor():
    lr = LRSchedule(max_steps=12, warmup_steps=2, shape="linear", min_ratio=0.0)
    assert [lr(s) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_stages_train_gate_skip_and_resume(tmp_path):
    out = tmp_path / "run"
    common = ["tiny-progressive", f"train.output_dir={out}", "train.max_steps=2", "train.global_batch_size=2",
              "train.micro_batch_size=1", "train.progress=false"]
    # 1. The second stage's gate cannot pass: the run stops there with the numbers, after both trained.
    proc = longtune("train", *common, "stages.1.gate.perplexity_below=1.0", check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("longtune: error:")]
    assert len(error) == 1 and "stage 2/2 (ctx1024): gate failed: perplexity" in error[0], proc.stderr[-3000:]
    assert "at 1024 tokens" in error[0] and "is not below 1" in error[0]
    first, second = out / "ctx512", out / "ctx1024"
    assert json.loads((first / "stage.json").read_text())["status"] == "complete"
    assert json.loads((second / "stage.json").read_text())["status"] == "gate_failed"
    # The second stage trained from the first one's export, its rope computed from the base model (256).
    config = json.loads((second / "model" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 1024
    assert "ctx512/model" in (second / "recipe.yaml").read_text()
    first_metrics = (first / "metrics.jsonl").read_text()

    # 2. Gate relaxed, one more step: stage 1 is skipped, stage 2 resumes from its checkpoint at step 2.
    proc = longtune("train", *common, "stages.1.gate.perplexity_below=1e9", "stages.1.train.max_steps=3",
                    timeout=240)
    assert "stage 1/2 (ctx512): complete" in proc.stderr and "skipped" in proc.stderr
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert (first / "metrics.jsonl").read_text() == first_metrics
    assert [m["step"] for m in metrics(second)] == [1, 2, 3]
    state = json.loads((second / "stage.json").read_text())
    assert state["status"] == "complete" and state["gate"]["passed"] and state["gate"]["length"] == 1024


def test_a_complete_stage_with_other_settings_is_refused(tmp_path):
    """Checked before any training: the stage dir says complete, but the recipe now asks for more steps."""
    recipe = load_recipe("tiny-progressive", [f"train.output_dir={tmp_path}"])
    stage_dir = tmp_path / "ctx512"
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "model" / "config.json").write_text("{}")
    changed = recipe.stage_recipe(0).model_copy(update={"train": recipe.stage_recipe(0).train.model_copy(
        update={"max_steps": 99})})
    (stage_dir / STAGE_FILE).write_text(json.dumps({"status": "complete", "recipe_digest": recipe_digest(changed)}))
    with pytest.raises(StageError, match=r"stage 1/2 \(ctx512\) was completed in .* with other settings"):
        run_stages(recipe)
    # Run-control keys (progress bar, wandb, resume) do not count as other settings.
    quiet = recipe.stage_recipe(0).train.model_copy(update={"progress": False, "resume": False})
    assert recipe_digest(recipe.stage_recipe(0).model_copy(update={"train": quiet})) == \
        recipe_digest(recipe.stage_recipe(0))
