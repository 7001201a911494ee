"""PoSE: rows of train.seq_len whose position ids skip ahead to cover extension.target_length — valid,
seeded, per document, attended as one document each, and trained end to end."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import longtune, losses
from longtune.parallel.dims import ParallelDims
from longtune.parallel.sharding import document_bounds
from longtune.parallel.sp_input import shard_micro_batch
from longtune.train.data import PoseSpec, StepBatches, pose_positions, row_to_example
from longtune.train.model import build_config, build_model, resolve_model_source
from longtune.train.recipe import RecipeError, recipe_from_dict


def _chunks(positions: list[int]) -> list[list[int]]:
    """Runs of positions that count up by one."""
    runs = [[positions[0]]]
    for p in positions[1:]:
        if p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


@pytest.mark.parametrize("length,target,chunks", [(256, 1024, 2), (100, 4096, 3), (7, 64, 4), (3, 8, 5)])
def test_positions_are_valid(length, target, chunks):
    for seed in range(50):
        pos = pose_positions(length, target, chunks, random.Random(seed))
        assert len(pos) == length and pos[0] == 0
        assert all(b > a for a, b in zip(pos, pos[1:], strict=False)), "positions must increase strictly"
        assert max(pos) < target
        assert len(_chunks(pos)) <= min(chunks, length)


def test_skips_cover_the_target_and_are_seeded():
    spec = PoseSpec(chunks=2, target_length=1024, seed=3)
    draws = [pose_positions(256, 1024, 2, spec.rng(i)) for i in range(200)]
    assert draws[5] == pose_positions(256, 1024, 2, PoseSpec(2, 1024, 3).rng(5)), "same seed and row: same skips"
    assert len({tuple(d) for d in draws}) > 150, "rows get different skips"
    assert max(max(d) for d in draws) > 1000 and min(max(d) for d in draws) < 400, "skips span the target"
    assert pose_positions(256, 1024, 2, PoseSpec(2, 1024, 4).rng(5)) != draws[5], "the seed changes them"


def test_documents_restart_and_keep_their_bounds():
    ids = list(range(10, 10 + 96))
    rng = random.Random(0)
    _, labels, pos = row_to_example(ids, [40, 56], document_masking=True, pose=(PoseSpec(2, 512, 0), rng))
    assert pos[0] == 0 and pos[40] == 0 and labels[39] == -100
    assert max(pos[:40]) >= 40 or max(pos[40:]) >= 56, "some document skips ahead"
    # A skip is not a document boundary; a restart is.
    assert document_bounds(torch.tensor([pos + [0, 1, 2]])) == [[(0, 40), (40, 96), (96, 99)]]
    _, _, whole = row_to_example(ids, [40, 56], document_masking=False, pose=(PoseSpec(2, 512, 0), random.Random(0)))
    assert whole[0] == 0 and all(b > a for a, b in zip(whole, whole[1:], strict=False))


def test_positions_do_not_depend_on_the_number_of_ranks():
    corpus = [{"input_ids": list(range(64)), "doc_lens": [30, 34]} for _ in range(8)]
    import datasets

    ds = datasets.Dataset.from_list(corpus)
    spec = PoseSpec(2, 1024, 0)

    def positions(dp: int) -> torch.Tensor:
        rows = []
        for rank in range(dp):
            b = StepBatches(ds, seed=0, global_batch=4, micro_batch=1, dp=dp, dp_rank=rank, pad_id=0,
                            document_masking=True, pose=spec)
            rows += [mb.position_ids for mb in b.for_step(1)]
        return torch.cat(rows)

    assert torch.equal(positions(1), positions(2))


def test_pose_attention_treats_each_document_as_one():
    """Through longtune's attention (what PoSE runs on, also on one process) a document with skips is one
    causal block; transformers' own packed-sequence detection would split it at every skip."""
    source = resolve_model_source("tiny-llama")
    config = build_config(source, 512, {})
    ours = build_model(source, config, device="cpu", attn_implementation="longtune_sp", seed=0)
    dense = build_model(source, config, device="cpu", attn_implementation="eager", seed=0)
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([list(range(20)) + list(range(120, 140)) + list(range(10)) + list(range(60, 74))])
    shard = shard_micro_batch(ids, ids, pos, torch.ones_like(ids, dtype=torch.bool), dims=ParallelDims(1), rank=0,
                              layout="zigzag", pad_id=0, groups={})
    mask = torch.full((64, 64), float("-inf"))
    for start, end in [(0, 40), (40, 64)]:
        mask[start:end, start:end] = torch.triu(torch.full((end - start, end - start), float("-inf")), 1)
    with torch.no_grad():
        got = ours(input_ids=shard.input_ids, position_ids=shard.position_ids, sp_context=shard.context).logits
        want = dense(input_ids=ids, position_ids=pos, attention_mask=mask[None, None]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_recipe_checks():
    def recipe(chunks, seq_len=256, **extension):
        ext = {"method": "linear", "target_length": 1024, "pose": {"chunks": chunks}, **extension}
        return recipe_from_dict({"extension": ext, "train": {"seq_len": seq_len}})

    assert recipe(2).extension.pose.chunks == 2 and recipe(0).extension.pose.chunks == 0
    with pytest.raises(RecipeError, match="chunks 1 has nothing to skip"):
        recipe(1)
    with pytest.raises(RecipeError, match="needs an extension.method"):
        recipe(2, method="none", target_length=None)
    with pytest.raises(RecipeError, match="train.seq_len 1024 already covers extension.target_length 1024"):
        recipe(2, seq_len=1024)
    with pytest.raises(RecipeError, match=r"unknown key 'extension.pose.chunk' \(did you mean 'chunks'"):
        recipe_from_dict({"extension": {"method": "linear", "target_length": 1024, "pose": {"chunk": 2}}})


def test_three_pose_steps_train(tmp_path):
    out = tmp_path / "run"
    longtune("train", "tiny-smoke", "extension.method=yarn", "extension.target_length=1024",
             "extension.pose.chunks=2", "train.seq_len=256", "train.max_steps=3", "train.global_batch_size=2",
             "train.micro_batch_size=1", "train.progress=false", f"train.output_dir={out}", timeout=180)
    got = losses(out)
    assert len(got) == 3 and all(0 < loss < 20 for loss in got)
    assert (out / "recipe.yaml").read_text().count("chunks: 2") == 1
