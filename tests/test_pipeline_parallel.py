"""Pipeline parallelism (torch.distributed.pipelining): loss curves equal the single-process run (fp32,
1e-5) for pp 2 with 1F1B, GPipe and interleaved 1F1B (4 layers), and mixed with sequence, data (DDP and
FSDP2) and tensor parallelism; the pp exports equal the 1-process export; a pp checkpoint resumes under
pp and in one process. Default: 1F1B + export, interleaved × ring 2; the rest is `slow`.
Without processes: chained stages compute the HF model's logits for every family (packed documents,
sliding windows), their keys are the HF keys, and bad layouts are refused with the numbers named."""

from __future__ import annotations

import pytest
import torch

from conftest import PARITY_ARGS, assert_close_curves, assert_same_export, longtune, losses, metrics

FOUR_LAYERS = "model.config_overrides.num_hidden_layers=4"


def _assert_same_curve(got, want):
    assert_close_curves(losses(got), losses(want), rel=1e-5)
    # The last stage reports; every token is counted once, however many stages hold its row.
    assert [m["tokens"] for m in metrics(got)] == [m["tokens"] for m in metrics(want)]


@pytest.fixture(scope="module")
def four_layer_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp-ref4")
    longtune("train", *PARITY_ARGS, FOUR_LAYERS, "train.export=false", f"train.output_dir={out}", timeout=120)
    return out


# -- processes -------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_pp2_1f1b_curve_and_export_equal_one_process(reference_run, tmp_path):
    proc = longtune("train", *PARITY_ARGS, "parallel.pp=2", f"train.output_dir={tmp_path}", timeout=150)
    assert "world 2 (dp 1, pp 2 (1f1b))" in proc.stderr
    _assert_same_curve(tmp_path, reference_run)
    assert_same_export(tmp_path / "model", reference_run / "model")


@pytest.mark.multiproc
@pytest.mark.slow  # CI time: pp 2 with 1F1B and pp × tp stay in the default suite
def test_interleaved_1f1b_with_ring2_equals_one_process(four_layer_reference, tmp_path):
    # 4 layers → 4 stages, 2 per rank; 4 processes: each stage's sequence is split over a ring of 2 and
    # the stages exchange their shards.
    proc = longtune("train", *PARITY_ARGS, FOUR_LAYERS, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                    "parallel.sp.ring=2", "train.export=false", f"train.output_dir={tmp_path}", timeout=200)
    assert "world 4 (dp 1, sp 2×1 (ring × ulysses, zigzag), pp 2 × 2 stages (interleaved_1f1b))" in proc.stderr
    _assert_same_curve(tmp_path, four_layer_reference)


@pytest.mark.slow
@pytest.mark.multiproc
def test_pp2_gpipe_equals_one_process(reference_run, tmp_path):
    longtune("train", *PARITY_ARGS, "parallel.pp=2", "parallel.pp_schedule=gpipe", "train.export=false",
             f"train.output_dir={tmp_path}", timeout=150)
    _assert_same_curve(tmp_path, reference_run)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("mix", [
    [],
    ["parallel.dp=2", "train.micro_batch_size=2"],  # 4 processes, each stage DDP over its two replicas
], ids=["pp2", "pp2-dp2"])
def test_interleaved_1f1b_equals_one_process(mix, four_layer_reference, tmp_path):
    longtune("train", *PARITY_ARGS, FOUR_LAYERS, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", *mix,
             "train.export=false", f"train.output_dir={tmp_path}", timeout=200)
    _assert_same_curve(tmp_path, four_layer_reference)


MIXES = {
    "dp2-ddp": ["parallel.dp=2", "train.micro_batch_size=2"],  # DDP over each stage's replicas, 1F1B
    "dp2-fsdp": ["parallel.dp=2", "parallel.fsdp=true", "parallel.pp_schedule=gpipe"],  # FSDP2 per stage
    "tp2": ["parallel.tp=2"],  # TP with sequence-parallel norms: stages exchange the local sequence shards
    "ring2-gpipe": ["parallel.sp.ring=2", "parallel.pp_schedule=gpipe"],
    # Ulysses 2 without pp moves one element of a rare embedding row by 3e-4 after 5 steps too (the Adam
    # effect of assert_same_export): the export is not compared here.
    "ulysses2": ["parallel.sp.ulysses=2", "train.export=false"],
}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("mix", MIXES)
def test_four_process_mixes_equal_one_process(mix, reference_run, tmp_path):
    longtune("train", *PARITY_ARGS, "parallel.pp=2", *MIXES[mix], f"train.output_dir={tmp_path}", timeout=250)
    _assert_same_curve(tmp_path, reference_run)
    if "train.export=false" not in MIXES[mix]:
        assert_same_export(tmp_path / "model", reference_run / "model")


@pytest.mark.slow
@pytest.mark.multiproc
def test_pp2_checkpoint_resumes_in_pp2_and_in_one_process(reference_run, tmp_path):
    # DCP per stage under HF keys: the checkpoint reshards to another pipeline split.
    for out in (tmp_path / "pp", tmp_path / "one"):
        longtune("train", *PARITY_ARGS, "parallel.pp=2", "train.max_steps=3", "train.export=false",
                 f"train.output_dir={out}", timeout=150)
    proc = longtune("train", *PARITY_ARGS, "parallel.pp=2", f"train.output_dir={tmp_path / 'pp'}", timeout=150)
    assert "resumed from" in proc.stderr
    proc = longtune("train", *PARITY_ARGS, f"train.output_dir={tmp_path / 'one'}", timeout=150)
    assert "resumed from" in proc.stderr
    for out in (tmp_path / "pp", tmp_path / "one"):
        _assert_same_curve(out, reference_run)


# -- without processes -------------------------------------------------------------------------------


def _tiny(flavour: str, layers: int = 4, **fields):
    from longtune.train.model import build_config, build_model, resolve_model_source

    source = resolve_model_source(flavour)
    config = build_config(source, 300, {"num_hidden_layers": layers, **fields})
    return build_model(source, config, device="cpu", attn_implementation="sdpa", seed=0)


FULL, SLIDING = "full_attention", "sliding_attention"


@pytest.mark.parametrize("flavour,fields", [
    ("tiny-llama", {}),
    ("tiny-qwen2", {"layer_types": [FULL] * 4}),  # layer_types has one entry per layer
    ("tiny-qwen3", {"layer_types": [FULL, SLIDING] * 2, "sliding_window": 5}),  # a mask per layer kind
    ("tiny-mistral", {"sliding_window": 5}),  # the sliding-window mask, narrower than the documents
], ids=["llama", "qwen2", "qwen3-mixed-kinds", "mistral-sliding"])
def test_chained_stages_compute_the_model(flavour, fields):
    from longtune.parallel.micro_batch import MicroBatchInputs
    from longtune.parallel.pipeline import micro_batch_inputs, split_stages

    model = _tiny(flavour, **fields).eval()
    # Two packed rows; documents restart their positions (block-diagonal masks).
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    positions[1] = torch.cat([torch.arange(17), torch.arange(7)])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        stages = split_stages(model, pp=2, pp_rank=0, stages_per_rank=2, boundary_dtype=torch.float32) + \
            split_stages(model, pp=2, pp_rank=1, stages_per_rank=2, boundary_dtype=torch.float32)
        stages.sort(key=lambda s: s.stage_index)
        assert [len(s.model.layers) for s in stages] == [1, 1, 1, 1]
        hidden = None
        with micro_batch_inputs([MicroBatchInputs({"input_ids": ids, "position_ids": positions}, ids)]):
            for stage in stages:
                hidden = stage(hidden, micro_batch=torch.tensor([0]))
    torch.testing.assert_close(hidden, want, rtol=0, atol=1e-5)
    keys = [k for s in stages for k in s.state_dict()]
    assert sorted(keys) == sorted(model.state_dict()) and len(keys) == len(set(keys))


def test_stage_split_and_placement():
    from longtune.parallel.pipeline import stage_ids, stage_layers

    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    assert stage_ids(0, 2, 2) == [0, 2] and stage_ids(1, 2, 2) == [1, 3]  # the last stage on the last rank
    with pytest.raises(ValueError, match="3 pipeline stages for 2 decoder layers"):
        stage_layers(2, 3)


def test_impossible_pipelines_are_refused_with_numbers():
    from longtune.parallel.layout_rules import pipeline_problem

    config = _tiny("tiny-llama", layers=2).config
    assert pipeline_problem(config, 2, 1, "1f1b", 2) is None
    assert pipeline_problem(config, 2, 2, "interleaved_1f1b", 2) == (
        "parallel.pp 2 × 2 stages per rank (= 4 stages) exceeds the model's 2 decoder layers (num_hidden_layers): "
        "every stage needs at least one")
    assert pipeline_problem(config, 3, 1, "gpipe", 3).startswith("parallel.pp 3 exceeds the model's 2 decoder")
    assert "needs at least pp (= 2) micro-batches per step, got 1" in pipeline_problem(config, 2, 1, "1f1b", 1)
    assert pipeline_problem(config, 2, 1, "gpipe", 1) is None
    tied = _tiny("tiny-llama", layers=2, tie_word_embeddings=True).config
    assert "tie_word_embeddings" in pipeline_problem(tied, 2, 1, "1f1b", 2)


def test_pipeline_recipe_checks():
    from longtune.train.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="parallel.pp 2 needs parallel.backend=native"):
        recipe_from_dict({"parallel": {"pp": 2, "backend": "deepspeed"}})
    with pytest.raises(RecipeError, match="interleaved_1f1b needs parallel.pp_stages_per_rank >= 2, got 1"):
        recipe_from_dict({"parallel": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 1}})
    with pytest.raises(RecipeError, match="pp_stages_per_rank 2 needs parallel.pp_schedule interleaved_1f1b"):
        recipe_from_dict({"parallel": {"pp": 2, "pp_stages_per_rank": 2}})
    recipe = recipe_from_dict({"parallel": {"pp": 2, "dp": 2, "pp_schedule": "interleaved_1f1b"}})
    assert recipe.parallel.stages_per_rank == 2 and recipe.process_count() == 4
