"""Sequence-chunked decoder layers: the same loss and gradients as the unchunked layers (packed documents,
chunk boundaries inside documents, keys/values and layer inputs in files), every projection run on one
chunk at a time, the chunked Ulysses and ring layouts, the recipe's rules, and 3-step curves under Ulysses +
FSDP2, a ring and the other memory savers."""

from __future__ import annotations

import pytest
import torch

from conftest import CURVE_ARGS, assert_close_curves, longtune, losses
from longtune.parallel.dims import ParallelDims
from longtune.parallel.layout import Layout
from longtune.parallel.parallelize import parallelize
from longtune.parallel.sequence_chunks import SequenceChunkedLayer
from longtune.parallel.sharding import shard_sequence, unshard_sequence
from longtune.parallel.sp_input import shard_micro_batch
from longtune.train.loss import token_loss_sum
from longtune.train.model import build_config, build_model, resolve_model_source
from longtune.train.recipe import RecipeError, recipe_from_dict

VOCAB, LENGTH = 300, 96
# Two rows of packed documents (positions restart): 40 + 56 and 10 + 86 tokens. With 3, 4 or 8 chunks the
# chunk boundaries fall inside documents and documents start inside chunks.
POSITIONS = torch.stack([torch.cat([torch.arange(40), torch.arange(56)]),
                         torch.cat([torch.arange(10), torch.arange(86)])])


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=gen)
    labels = torch.randint(3, VOCAB, (2, LENGTH), generator=gen)
    labels[0, 20:30] = -100
    return ids, labels


def _model(layout: Layout):
    source = resolve_model_source("tiny-llama")
    model = build_model(source, build_config(source, VOCAB, {"num_hidden_layers": 2}), device="cpu",
                        attn_implementation="sdpa", seed=0)
    [model] = parallelize(model, ParallelDims(1), layout, data_parallel="none")
    return model


def _loss_and_grads(model, chunks: int):
    ids, labels = _batch()
    shard = shard_micro_batch(ids, labels, POSITIONS, torch.ones_like(ids, dtype=torch.bool), dims=ParallelDims(1),
                              rank=0, layout="zigzag", pad_id=0, groups={}, chunks=chunks)
    logits = model(input_ids=shard.input_ids, position_ids=shard.position_ids, sp_context=shard.context).logits
    loss = token_loss_sum(logits, shard.labels)
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def unchunked():
    """The same attention path (longtune's document-masked kernels on one process) without chunks."""
    return _loss_and_grads(_model(Layout(recompute="full", dtype="float32", pose=True)), 1)


@pytest.mark.parametrize("chunks,disk", [(3, False), (4, False), (8, True)])
def test_chunked_layers_give_the_unchunked_loss_and_gradients(chunks, disk, unchunked, tmp_path):
    layout = Layout(recompute="full", dtype="float32", sequence_chunks=chunks, offload_checkpoints=disk,
                    offload_tier="disk" if disk else "host", offload_dir=str(tmp_path) if disk else None)
    model = _model(layout)
    assert all(isinstance(layer, SequenceChunkedLayer) for layer in model.model.layers)
    loss, grads = _loss_and_grads(model, chunks)
    ref_loss, ref_grads = unchunked
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = ((grads[name] - g).abs().max() / g.abs().max()).item()
        assert err <= 1e-6, f"{name}: {err:.2e}"
    if disk:  # keys/values and layer inputs went to files, and every file is gone after backward
        layer = model.model.layers[0]
        layer.kv_tier.flush(), layer.input_tier.flush()  # a file dropped while written goes when its write ends
        assert layer.kv_tier.directory.exists() and not [p for p in tmp_path.rglob("*.bin")]


def test_every_projection_sees_one_chunk_forward_and_backward():
    model = _model(Layout(recompute="full", dtype="float32", sequence_chunks=4))
    seen: list[int] = []
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer._checkpoint_wrapped_module.self_attn, name).register_forward_hook(
                lambda _m, args, _out: seen.append(args[0].shape[1]))
        layer._checkpoint_wrapped_module.mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    _loss_and_grads(model, 4)
    # 2 layers × 5 modules × 4 chunks, forward and backward's recomputation.
    assert seen == [LENGTH // 4] * (2 * 5 * 4 * 2)


def test_chunked_ulysses_layout_puts_global_chunk_i_in_every_ranks_local_chunk_i():
    x = torch.arange(48)[None]
    shards = [shard_sequence(x, "zigzag", 1, 0, 2, u, chunks=3) for u in range(2)]
    assert shards[0].tolist() == [[*range(0, 8), *range(16, 24), *range(32, 40)]]
    # Local chunk 1 of rank 0 then of rank 1: global chunk 1 (16 … 31) in order, as the all-to-all gathers it.
    assert torch.cat([s[:, 8:16] for s in shards], dim=1).tolist() == [list(range(16, 32))]
    assert torch.equal(unshard_sequence([shards], "zigzag", chunks=3), x)


def test_chunked_ring_layout_makes_block_r_of_chunk_i_block_i_ring_plus_r():
    x = torch.arange(48)[None]  # 2 chunks of 24, each 2 ring blocks of 12, each split over 2 Ulysses ranks
    shards = [[shard_sequence(x, "contiguous", 2, r, 2, u, chunks=2) for u in range(2)] for r in range(2)]
    assert shards[1][0].tolist() == [[*range(12, 18), *range(36, 42)]]
    # Local chunk i of ring rank r's Ulysses ranks, gathered: block i·2 + r of a contiguous layout of 4 blocks.
    for i in range(2):
        for r in range(2):
            block = torch.cat([s[:, 6 * i:6 * i + 6] for s in shards[r]], dim=1)
            assert block.tolist() == [list(range((2 * i + r) * 12, (2 * i + r + 1) * 12))]
    assert torch.equal(unshard_sequence(shards, "contiguous", chunks=2), x)
    with pytest.raises(ValueError, match="contiguous blocks"):
        shard_sequence(x, "zigzag", 2, 0, 1, 0, chunks=2)


@pytest.mark.parametrize("overrides,message", [
    ({}, "set memory.recompute=full"),
    ({"memory": {"recompute": "full"}, "parallel": {"sp": {"ring": 2}}}, "parallel.sp.ring_impl=ring"),
    ({"memory": {"recompute": "full"}, "parallel": {"tp": 2}}, "parallel.tp > 1"),
    ({"memory": {"recompute": "full"}, "parallel": {"backend": "deepspeed", "deepspeed": {"zero_stage": 3}}},
     "zero_stage 3"),
])
def test_recipe_refuses_what_chunked_layers_do_not_combine_with(overrides, message):
    data = {"model": {"name_or_path": "tiny-llama"}, "memory": {"sequence_chunks": 4}}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


CHUNKED = ("memory.recompute=full", "memory.sequence_chunks=4")
CURVES = {
    # Every saver of one process with it: tiled MLP / loss inside the chunks, inputs, keys/values, gradients and
    # AdamW's state in files.
    "one-process+tiling+disk-offload": [
        *CHUNKED, "memory.tiled_mlp=true", "memory.tiled_mlp_chunk=50", "memory.tiled_loss=true",
        "memory.tiled_loss_chunk=100", "memory.offload.checkpoints=true", "memory.offload.gradients=true",
        "memory.offload.optimizer_swap=true", "memory.offload.tier=disk"],
    "ulysses2+fsdp2+tiling": [*CHUNKED, "parallel.sp.ulysses=2", "parallel.fsdp=true", "memory.tiled_mlp=true",
                              "memory.tiled_mlp_chunk=50", "memory.tiled_loss=true", "memory.tiled_loss_chunk=100"],
    "ulysses2+ddp": [*CHUNKED, "parallel.sp.ulysses=2"],
    # The recipe's contiguous ring (exactness on 2 and 4 ranks: tests/test_sequence_parallel.py's chunked cases).
    "ring2+tiling": [*CHUNKED, "parallel.sp.ring=2", "parallel.sp.ring_impl=ring", "memory.tiled_mlp=true",
                     "memory.tiled_mlp_chunk=50", "memory.tiled_loss=true", "memory.tiled_loss_chunk=100"],
    "dp2+zero2": [*CHUNKED, "parallel.dp=2", "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2"],
}


@pytest.mark.multiproc
# slow (CI time): the default suite keeps Ulysses + FSDP2 + tiling; one process's exactness, disk tier included, is
# the in-process gradient test above.
@pytest.mark.parametrize("case", [k if k == "ulysses2+fsdp2+tiling" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in CURVES])
def test_three_step_curve_is_unchanged(case, curve_reference, tmp_path):
    longtune("train", *CURVE_ARGS, *CURVES[case], f"train.output_dir={tmp_path}")
    assert_close_curves(losses(tmp_path), losses(curve_reference), rel=1e-5)
    assert not (tmp_path / "offload").exists()
