"""Memory model, time model and `longtune plan` (parallel/memory_model.py, time_model.py, planner.py,
train/commands/plan.py)."""

from __future__ import annotations

import pytest

from conftest import PYTHON, REPO, run
from longtune.parallel.dims import ParallelDims
from longtune.parallel.layout import Layout
from longtune.parallel.memory_model import (
    GIB,
    ModelShape,
    activation_terms,
    attention_saved_per_token,
    gradients_bytes,
    kept_logits_bytes,
    layer_backward_phases,
    logits_loss_bytes,
    mask_bytes,
    memory_breakdown,
    model_level_saved_bytes,
    optimizer_bytes,
    recompute_working_set,
    sequence_parallel_buffers,
    weights_bytes,
)
from longtune.parallel.planner import (
    Hardware,
    enumerate_layouts,
    layout_problem,
    max_length,
    plan,
    sequence_chunk_counts,
)
from longtune.parallel.time_model import (
    Calibration,
    chunked_kv_traffic,
    communication,
    document_fill,
    kernel_length,
    step_flops,
    step_time,
)
from longtune.train.cli import main as cli_main
from longtune.train.recipe import load_recipe
from longtune.train.recipe_layout import layout_from_recipe, recipe_for_layout, resolve_shape

# hidden 8, 2 layers, 2 query heads / 1 KV head of 4, MLP 16, vocabulary 32.
SMALL = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=32)
FP32 = Layout(dtype="float32")
L = 10


def test_parameter_count_by_hand():
    layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16 + 2 * 8  # q, k, v, o, gate/up/down, 2 norms = 592
    assert SMALL.layer_params == layer
    assert SMALL.params == 2 * layer + 32 * 8 + (32 * 8 + 8)  # + embeddings, lm_head and final norm = 1704
    tied = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=32, tied_embeddings=True)
    assert SMALL.params - tied.params == 32 * 8


def test_weights_gradients_optimizer_by_hand():
    assert weights_bytes(SMALL, FP32) == 4 * 1704
    assert gradients_bytes(SMALL, FP32) == 4 * 1704
    assert optimizer_bytes(SMALL, FP32) == 8 * 1704  # AdamW exp_avg + exp_avg_sq, fp32
    zero1 = Layout(dp=2, sharding="zero1", dtype="float32")
    assert (weights_bytes(SMALL, zero1), gradients_bytes(SMALL, zero1), optimizer_bytes(SMALL, zero1)) == (
        4 * 1704, 4 * 1704, 4 * 1704)
    fsdp = Layout(dp=2, sp_ulysses=2, sharding="fsdp", dtype="float32")  # shards over dp × sp = 4
    assert (weights_bytes(SMALL, fsdp), gradients_bytes(SMALL, fsdp), optimizer_bytes(SMALL, fsdp)) == (
        1704, 1704, 2 * 1704)
    # tp shards the layers only; pp keeps its stage's layers and the larger end (embeddings or head).
    assert weights_bytes(SMALL, Layout(tp=2, dtype="float32")) == 4 * (592 + 256 + 264)
    assert weights_bytes(SMALL, Layout(pp=2, grad_accum=2, dtype="float32")) == 4 * (592 + 264)


def test_activations_by_hand():
    # Per token and layer, fp32: norms 4·4·8 + 2 fp32 x·rsqrt 2·4·8 + 2 rsqrt 8 = 200; attention q, out (8 each)
    # and GQA k, v (4 each) 4·24 = 96 + lse 4·2 = 104; MLP 4 · 16 · 4 = 256.
    assert activation_terms(SMALL, FP32, L) == (2 * L * (200 + 104 + 256), 0.0)
    # Full recompute: each layer keeps its input, 8 floats.
    assert activation_terms(SMALL, Layout(recompute="full", dtype="float32"), L) == (2 * L * 32, 0.0)
    assert activation_terms(SMALL, Layout(recompute="full", offload_checkpoints=True, dtype="float32"), L) == (
        0.0, 2 * L * 32)
    # Selective every 2nd layer: layer 0 recomputed, layer 1 kept.
    sel = Layout(recompute="selective", recompute_every=2, dtype="float32")
    assert activation_terms(SMALL, sel, L) == (L * (32 + 560), 0.0)
    sel_mlp = Layout(recompute="selective", recompute_modules=("mlp",), dtype="float32")
    assert activation_terms(SMALL, sel_mlp, L) == (2 * L * (200 + 104), 0.0)
    # Tiled MLP: the intermediates are not saved.
    assert activation_terms(SMALL, Layout(tiled_mlp_chunk=4, dtype="float32"), L) == (2 * L * (200 + 104), 0.0)
    # sdpa with a packed-document mask: k, v repeated to 2 heads (8 each) and a float mask row, 4·L bytes.
    masked = Layout(attention="sdpa_masked", dtype="float32")
    assert attention_saved_per_token(SMALL, masked, L) == 4 * 32 + 8 + 4 * L
    assert mask_bytes(masked, L) == L * L
    # Ulysses 2: the KV head replicated to 2, plus the inverse all-to-all's output (hidden).
    uly = Layout(sp_ulysses=2, dtype="float32")
    assert attention_saved_per_token(SMALL, uly, L) == 4 * 32 + 8 + 4 * 8
    assert model_level_saved_bytes(SMALL, FP32, L) == L * (3 * 4 * 8 + 4 + 2 * 4 * 4 + 24)


def _freed_by_step(mem) -> float:
    """The forward's saved tensors, gone by the optimizer step (its transient replaces them)."""
    return sum(mem.device.get(k, 0.0) for k in ("activations", "model_level_activations", "attention_mask"))


def test_unsharded_gradients_by_phase():
    # One process: while the activations peak only lm_head's, the final norm's and one layer's
    # gradients exist; all 4·P of them only at the optimizer step. The final norm's 12·h per token is freed
    # before the layers' backward.
    plain = memory_breakdown(SMALL, FP32, L)
    assert "gradients" not in plain.device
    top = 4 * (SMALL.head_params + SMALL.layer_params)
    assert top < 4 * SMALL.params
    assert plain.transient["logits_loss"] == logits_loss_bytes(SMALL, FP32, L) + top
    assert plain.transient["layer_backward"] == pytest.approx(
        kept_logits_bytes(SMALL, FP32, L) + max(layer_backward_phases(SMALL, FP32, L).values()) + top - 12 * 8 * L)
    cpu = memory_breakdown(SMALL, FP32, L, host_is_device=True)
    assert cpu.transient["optimizer_step"] == (4 * SMALL.params + 2 * 4 * SMALL.vocab * SMALL.hidden
                                               - _freed_by_step(cpu))
    # Sharded (FSDP), offloaded or pipelined gradients stay a standing term, with no step transient.
    for layout in (Layout(sharding="fsdp", dp=2, dtype="float32"), Layout(pp=2, dtype="float32")):
        mem = memory_breakdown(SMALL, layout, L)
        assert mem.device["gradients"] == gradients_bytes(SMALL, layout)
        assert "optimizer_step" not in mem.transient
    # DDP (dp × sp > 1): gradient_as_bucket_view makes the gradients DDP's buckets, standing from wrapping on,
    # one copy; the step adds AdamW's scratch only.
    ddp = Layout(dp=2, dtype="float32")
    mem = memory_breakdown(SMALL, ddp, L, host_is_device=True)
    assert mem.device["gradients"] == 4 * SMALL.params
    assert mem.transient["optimizer_step"] == 2 * 4 * SMALL.vocab * SMALL.hidden - _freed_by_step(mem)
    assert mem.transient["logits_loss"] == logits_loss_bytes(SMALL, ddp, L)


def test_disk_tier_and_optimizer_swap_leave_the_cpu_process():
    # On CPU, host memory is the process's: host-tier offload changes nothing, the disk tier takes the
    # checkpoints (2 layers × hidden 8 × 4 bytes per token) and the swapped AdamW state out of it; the
    # state comes back for the step, when the activations are gone.
    full = dict(recompute="full", offload_checkpoints=True, dtype="float32")
    host = memory_breakdown(SMALL, Layout(**full, optimizer_swap=True), L, host_is_device=True)
    disk = memory_breakdown(SMALL, Layout(**full, optimizer_swap=True, offload_tier="disk"), L, host_is_device=True)
    assert host.device["offloaded_checkpoints (host)"] == 2 * 8 * 4 * L
    assert host.device["optimizer"] == 8 * SMALL.params and "optimizer_step" in host.transient
    assert disk.disk == {"optimizer (between steps)": 8 * SMALL.params, "offloaded_checkpoints": 2 * 8 * 4 * L}
    assert "optimizer" not in disk.device and "offloaded_checkpoints (host)" not in disk.device
    assert disk.transient["optimizer_step"] == host.transient["optimizer_step"] + 8 * SMALL.params
    # The checkpoint read back from disk is a new tensor next to the recomputed layer's activations.
    assert disk.transient["layer_backward"] == host.transient["layer_backward"] + 8 * 4 * L
    # On a GPU the host tier takes the state off the device as well.
    gpu = memory_breakdown(SMALL, Layout(**full, optimizer_swap=True), L)
    assert gpu.host["optimizer (between steps)"] == 8 * SMALL.params and "optimizer" not in gpu.device


def test_gradient_offload_leaves_one_layer_of_gradients_in_backward():
    full = dict(recompute="full", offload_checkpoints=True, offload_tier="disk", dtype="float32")
    kept = memory_breakdown(SMALL, Layout(**full), L, host_is_device=True)
    out = memory_breakdown(SMALL, Layout(**full, offload_gradients=True), L, host_is_device=True)
    assert out.disk["gradients (backward to step)"] == 4 * SMALL.params
    # The last layer's backward holds that layer's gradients instead of every one; the top layer's, without
    # lm_head's; the step gets them all back.
    last = "layer_backward (last layer)"
    assert kept.transient[last] - out.transient[last] == 4 * (SMALL.params - SMALL.layer_params)
    assert kept.transient["layer_backward"] - out.transient["layer_backward"] == 4 * SMALL.head_params
    assert out.transient["optimizer_step"] == kept.transient["optimizer_step"]
    # The host tier on CPU is the same memory: nothing changes.
    host = dict(full, offload_tier="host")
    assert (memory_breakdown(SMALL, Layout(**host, offload_gradients=True), L, host_is_device=True)
            == memory_breakdown(SMALL, Layout(**host), L, host_is_device=True))


def test_transients_by_hand():
    # logits, log-softmax, their gradients: 4 × tokens × vocab × 4 bytes.
    assert logits_loss_bytes(SMALL, FP32, L) == 4 * L * 32 * 4
    assert logits_loss_bytes(SMALL, Layout(tiled_loss_chunk=4, dtype="float32"), L) == 4 * 4 * 32 * 4
    # Tensor parallelism: each rank holds vocab / tp of the logits (not with tied embeddings), none kept whole;
    # the vocabulary-parallel cross-entropy keeps the logits and the softmax (which becomes their gradient).
    assert logits_loss_bytes(SMALL, Layout(tp=2, dtype="float32"), L) == L * 16 * 2 * 4
    assert kept_logits_bytes(SMALL, Layout(tp=2, dtype="float32"), L) == 0
    # Backward through one layer: max(3 MLP gradients + 2 hidden, dq dk dv dout + 1 hidden).
    assert max(layer_backward_phases(SMALL, FP32, L).values()) == L * 4 * max(3 * 16 + 2 * 8, 4 * 8 + 8)
    assert recompute_working_set(SMALL, FP32, L) == 0
    # A recomputed layer again, less its input: that is the checkpoint (560 - 32), unless an offloaded
    # checkpoint comes back to a separate device.
    assert recompute_working_set(SMALL, Layout(recompute="full", dtype="float32"), L) == L * 528
    offloaded = Layout(recompute="full", offload_checkpoints=True, dtype="float32")
    assert recompute_working_set(SMALL, offloaded, L) == L * 560
    assert recompute_working_set(SMALL, offloaded, L, host_is_device=True) == L * 528
    assert recompute_working_set(SMALL, Layout(tiled_mlp_chunk=4, dtype="float32"), L) == 4 * 256
    # Ulysses: send + receive buffers of q + 2 kv (8 + 2·8) per local token; ring: 4 k + v blocks.
    assert sequence_parallel_buffers(SMALL, Layout(sp_ulysses=2, dtype="float32"), L) == 2 * 4 * 5 * 24
    assert sequence_parallel_buffers(SMALL, Layout(sp_ring=2, dtype="float32"), L) == 4 * 4 * 5 * 8


def test_layer_backward_phases_by_hand():
    # Full recompute + tiled MLP (chunk 4), one process: the recomputed layer is norms 200 + attention 104
    # less its input (the checkpoint, 32) = 272 bytes per token.
    # MLP phase: + one chunk's three MLP gradients (4 tokens x 3 x 16 x 4) + residual and norm gradients (2 x 32).
    # Attention phase: the post-attention norm's half of the norms (100) is gone; dq dk dv dout (4 x 8 x 4) +
    # the residual gradient (32).
    layout = Layout(recompute="full", tiled_mlp_chunk=4, dtype="float32")
    phases = layer_backward_phases(SMALL, layout, L)
    assert phases == {"mlp": L * (272 + 64) + 4 * 192, "attention": L * (272 - 100 + 160)}
    # Ulysses 2 (5 local tokens): attention saves 168 per token (the KV head replicated, o_proj's input), so
    # the recomputed layer is 200 + 168 - 32 = 336. The all-to-all buffers (2 x 4 x 24 per token) + residual
    # replace the attention gradients at the exchange; they are not added to the MLP phase, the peak.
    uly = Layout(recompute="full", tiled_mlp_chunk=4, sp_ulysses=2, dtype="float32")
    phases = layer_backward_phases(SMALL, uly, L)
    exchange = sequence_parallel_buffers(SMALL, uly, L) + 5 * 32
    assert phases == {"mlp": 5 * (336 + 64) + 4 * 192, "attention": 5 * (336 - 100) + exchange}
    # Under sp = 2 DDP wraps the model: the gradients are its standing buckets, not a transient term.
    assert memory_breakdown(SMALL, uly, L).transient["layer_backward"] == pytest.approx(
        kept_logits_bytes(SMALL, uly, L) - 5 * 12 * 8 + max(phases.values()))
    # Without recomputation the saved tensors are standing activations; the phases add gradients only.
    assert layer_backward_phases(SMALL, FP32, L) == {"mlp": L * 256, "attention": L * 160}


def test_sequence_chunked_layer_by_hand():
    # SMALL, fp32, 10 tokens in 2 chunks of 5. Each layer keeps its input only (8 floats per token), as under
    # full recompute, whatever `recompute` says.
    chunked = Layout(sequence_chunks=2, dtype="float32")
    assert activation_terms(SMALL, chunked, L) == activation_terms(SMALL, Layout(recompute="full", dtype="float32"), L)
    # One chunk's recomputed backward (5 tokens): MLP phase 528 recomputed + 256 gradients per token; attention
    # phase 528 - 356 freed + 160 gradients. Then the whole sequence's output and input gradients (fp32 stream,
    # 2 x 32 per token), two chunks' K/V (5 tokens x 32 bytes) and three fp32 tensors of their size, and the
    # chunk's parameter gradients (592 fp32).
    spans = 2 * 32 * L + 5 * 32 * (2 + 3) + 4 * 592
    assert layer_backward_phases(SMALL, chunked, L) == {"mlp": 5 * 784 + spans, "attention": 5 * 332 + spans}
    assert recompute_working_set(SMALL, chunked, L) == 5 * 528
    # Every layer's K/V (2 layers x 10 tokens x 32 bytes) and one layer's fp32 dK/dV go to the tier; an offloaded
    # input comes back whole for the layer's backward (on a GPU).
    offloaded = Layout(sequence_chunks=2, recompute="full", offload_checkpoints=True, dtype="float32")
    mem = memory_breakdown(SMALL, offloaded, L)
    assert (mem.host["sequence_chunk_kv"], mem.host["sequence_chunk_kv_grads"]) == (2 * L * 32, L * 32)
    assert max(layer_backward_phases(SMALL, offloaded, L).values()) == 5 * 784 + spans + 32 * L
    disk = memory_breakdown(SMALL, Layout(sequence_chunks=2, recompute="full", offload_checkpoints=True,
                                          offload_tier="disk", dtype="float32"), L)
    assert disk.peak_disk == 2 * L * 32 + L * 32 + 2 * L * 32 and "sequence_chunk_kv" not in disk.host


def test_sequence_chunks_lower_the_peak_by_the_layer_working_set():
    shape = resolve_shape("llama-3-8b")
    base = dict(sharding="fsdp", recompute="full", offload_checkpoints=True, offload_optimizer=True,
                offload_params=True, tiled_loss_chunk=2048, tiled_mlp_chunk=4096)
    length = 262144
    plain = memory_breakdown(shape, Layout(**base), length)
    chunked = memory_breakdown(shape, Layout(**base, sequence_chunks=16), length)
    # The standing device terms are the same; only the layer's backward shrinks, by the difference of the two
    # working sets; the K/V wait in host memory.
    assert chunked.device == plain.device
    saved = (max(layer_backward_phases(shape, Layout(**base), length).values())
             - max(layer_backward_phases(shape, Layout(**base, sequence_chunks=16), length).values()))
    assert saved > 10 * GIB
    assert plain.transient["layer_backward"] - chunked.transient["layer_backward"] == pytest.approx(saved)
    assert chunked.peak_device < plain.peak_device
    # layers x tokens x (K, V) x KV heads x head_dim x bf16
    assert chunked.host["sequence_chunk_kv"] == 32 * length * 2 * 8 * 128 * 2


def test_sequence_chunk_time():
    shape = resolve_shape("llama-3-8b")
    cal = Calibration.gpu_default()
    full = Layout(recompute="full")
    # Recomputed once (not twice under recompute=full), the same attention FLOPs, kernels over L / chunks.
    for chunked in (Layout(sequence_chunks=8), Layout(recompute="full", sequence_chunks=8)):
        assert step_flops(shape, chunked, 65536) == step_flops(shape, full, 65536)
    assert kernel_length(Layout(sp_ulysses=4, sequence_chunks=8), 65536) == 8192
    # K/V tier traffic per layer: write C, then (N - 1) / 2 passes of C read forward, twice backward, and the fp32
    # accumulators (2 x C) read and written: C (1 + 3.5 x (3 + 4)) for 8 chunks.
    layer_kv = 65536 * 2 * 8 * 128 * 2
    assert chunked_kv_traffic(shape, Layout(sequence_chunks=8), 65536) == 32 * layer_kv * (1 + 3.5 * 7)
    assert chunked_kv_traffic(shape, full, 65536) == 0
    # Half hidden behind the compute, like the other copies, unless the tier is slower than it: then all the excess.
    assert step_time(shape, Layout(sequence_chunks=8), 65536, cal).terms["sequence_chunk_kv"] == pytest.approx(
        0.5 * 32 * layer_kv * 25.5 / cal.host_bw)
    cal.disk_bw = 1e6
    slow = step_time(shape, Layout(sequence_chunks=8, recompute="full", offload_checkpoints=True,
                                   offload_tier="disk"), 65536, cal)
    compute = slow.terms["dense_compute"] + slow.terms["attention_compute"]
    assert slow.terms["sequence_chunk_kv"] == pytest.approx(32 * layer_kv * 25.5 / 1e6 - compute)


def test_planner_chunks_only_where_needed():
    shape = resolve_shape("llama-3-8b")
    assert sequence_chunk_counts(262144) == [4, 8, 16, 32] and sequence_chunk_counts(12288) == []
    for refused in (Layout(recompute="full", sp_ring=2, sequence_chunks=4), Layout(sequence_chunks=4),
                    Layout(recompute="full", sharding="zero3", dp=2, sequence_chunks=4)):
        assert layout_problem(shape, refused, 65536) is not None
    assert "does not divide" in layout_problem(shape, Layout(recompute="full", sequence_chunks=3), 65536)
    ring = Layout(recompute="full", sp_ring=2, sp_layout="contiguous", sequence_chunks=4)  # a chunked ring
    assert layout_problem(shape, ring, 65536) is None
    ring_recipe = recipe_for_layout(ring, "llama-3-8b", 65536)
    assert ring_recipe.parallel.sp.ring_impl == "ring" and layout_from_recipe(ring_recipe, 2).sp_layout == "contiguous"
    one = Hardware(gpus=1, gpu_mem_gib=80, host_mem_gib=1024, gpus_per_node=1)
    cal = Calibration.gpu_default()
    short = [r for r in plan(shape, 131072, one, cal) if r.fits]
    assert short[0].layout.sequence_chunks == 1  # unchunked layouts fit: chunking would only cost
    assert any(r.layout.sequence_chunks > 1 for r in short)
    long = [r for r in plan(shape, 1 << 20, one, cal) if r.fits]
    assert long and all(r.layout.sequence_chunks > 1 for r in long)
    for row in long:  # every chunked layout it may pick is one the recipe loader accepts
        recipe = recipe_for_layout(row.layout, "llama-3-8b", 1 << 20)
        assert recipe.memory.sequence_chunks == row.layout.sequence_chunks
        assert layout_from_recipe(recipe, 1).describe() == row.layout.describe()
    # Without host memory for the K/V and checkpoints the disk tier holds them, within the node's NVMe.
    small_host = Hardware(gpus=1, gpu_mem_gib=80, host_mem_gib=160, gpus_per_node=1)
    best = next(r for r in plan(shape, 1 << 20, small_host, cal) if r.fits)
    assert best.layout.offload_tier == "disk" and best.memory.peak_disk > 300 * GIB
    no_disk = Hardware(gpus=1, gpu_mem_gib=80, host_mem_gib=160, gpus_per_node=1, disk_gib=100)
    assert not any(r.fits for r in plan(shape, 1 << 20, no_disk, cal))


def test_monotonicity():
    shape = resolve_shape("llama-3-8b")
    base = Layout(sharding="fsdp", dp=8)
    length = 32768
    plain = memory_breakdown(shape, base, length)
    recomputed = memory_breakdown(shape, Layout(sharding="fsdp", dp=8, recompute="full"), length)
    assert recomputed.device["activations"] < plain.device["activations"] / 10
    tiled = memory_breakdown(shape, Layout(sharding="fsdp", dp=8, tiled_loss_chunk=2048), length)
    # Tiled loss removes the length × vocabulary logits: only one chunk's remain.
    assert tiled.transient["logits_loss"] * (length / 2048) == pytest.approx(plain.transient["logits_loss"])
    sp2 = memory_breakdown(shape, Layout(sharding="fsdp", dp=4, sp_ulysses=2), length)
    assert sp2.device["activations"] < 0.6 * plain.device["activations"]
    ring2 = memory_breakdown(shape, Layout(sharding="fsdp", dp=4, sp_ring=2), length)
    assert ring2.device["activations"] == pytest.approx(plain.device["activations"] / 2)
    longer = memory_breakdown(shape, base, 2 * length)
    assert longer.peak_device > plain.peak_device
    assert memory_breakdown(shape, Layout(sharding="fsdp", dp=8, offload_optimizer=True), length).peak_device < (
        plain.peak_device)


def test_time_model_terms():
    shape = resolve_shape("llama-3-8b")
    cal = Calibration.gpu_default()
    dense, attn = step_flops(shape, Layout(), 8192)
    assert dense == pytest.approx(8192 * 3 * 2 * (shape.params - shape.embedding_params))
    assert attn == pytest.approx(3 * 4 * 8192**2 * shape.q_width * shape.layers / 2)
    dense_rc, attn_rc = step_flops(shape, Layout(recompute="full"), 8192)
    assert attn_rc == pytest.approx(attn * 4 / 3)  # recompute adds one forward
    comm = communication(shape, Layout(sp_ulysses=4, dp=2, sharding="fsdp"), 65536, cal)
    assert set(comm) == {"ulysses_all_to_all", "data_parallel"}
    assert communication(shape, Layout(sp_ring=2), 65536, cal)["ring_p2p"] > 0
    slow_links = Calibration.gpu_default()
    slow_links.intra_bw /= 100
    assert step_time(shape, Layout(sp_ulysses=8), 65536, slow_links).seconds > (
        step_time(shape, Layout(sp_ulysses=8), 65536, cal).seconds)


def test_document_fill_scales_only_the_attention_that_skips_masked_blocks():
    """Σ d² / L² against a brute-force count of the (query, key) pairs a causal document mask keeps, then
    its effect: the block kernels' attention FLOPs scale by it, sdpa with the mask computes all of L²."""
    lens = [[64], [32, 32], [10, 50, 4]]
    pairs = [sum(d * (d + 1) // 2 for d in row) / (64 * 65 // 2) for row in lens]
    fill = document_fill(lens, 64)
    assert fill == pytest.approx(sum(pairs) / len(pairs), rel=0.05)
    assert document_fill([[64]], 64) == 1.0 and document_fill([[32, 32]], 64) == 0.5
    shape = resolve_shape("tiny-llama")
    _, attn = step_flops(shape, Layout(), 4096)
    _, attn_fill = step_flops(shape, Layout(), 4096, doc_fill=0.25)
    assert attn_fill == pytest.approx(attn / 4)
    masked = Layout(attention="sdpa_masked")
    assert step_flops(shape, masked, 4096, doc_fill=0.25) == step_flops(shape, masked, 4096)
    cal = Calibration.cpu_default()
    assert step_time(shape, Layout(sp_ulysses=2), 4096, cal, doc_fill=0.3).tokens_per_s > (
        step_time(shape, Layout(sp_ulysses=2), 4096, cal).tokens_per_s)


def test_attention_rate_by_kernel_length():
    """The calibrated attention FLOP/s by row length: exact at the calibrated lengths, log-linear between
    them, clamped outside; the length a kernel call sees follows the layout and the documents."""
    cal = Calibration.cpu_default()
    assert cal.attention_rate(4096) == cal.attention_flops  # no table: the single figure
    cal.attention_flops_by_length = {"1024": 20e9, "4096": 40e9}
    assert cal.attention_rate(1024) == 20e9 and cal.attention_rate(4096) == 40e9
    assert cal.attention_rate(2048) == pytest.approx(30e9)  # halfway in log length
    assert cal.attention_rate(256) == 20e9 and cal.attention_rate(65536) == 40e9
    assert kernel_length(Layout(attention="sdpa_masked"), 8192, doc_fill=0.2) == 8192
    assert kernel_length(Layout(sp_ring=4), 8192) == 2048
    assert kernel_length(Layout(sp_ulysses=4), 8192) == 8192
    assert kernel_length(Layout(sp_ulysses=4), 8192, doc_fill=0.25) == 2048  # Σd²/Σd: the work-weighted doc
    shape = resolve_shape("tiny-llama")
    slow_short = step_time(shape, Layout(), 8192, cal, doc_fill=0.1)
    assert slow_short.terms["attention_compute"] == pytest.approx(
        step_flops(shape, Layout(), 8192, doc_fill=0.1)[1] / 20e9)


def test_calibration_round_trip(tmp_path):
    cal = Calibration.cpu_default()
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == cal


@pytest.mark.parametrize("model, world", [("llama-3-8b", 8), ("tiny-llama", 4), ("qwen2.5-7b", 4)])
def test_enumerated_layouts_are_valid(model, world):
    shape = resolve_shape(model)
    layouts = list(enumerate_layouts(shape, world, 8192))
    assert layouts
    for lay in layouts:
        assert lay.world == world
        ParallelDims(world, dp=lay.dp, pp=lay.pp, sp_ring=lay.sp_ring, sp_ulysses=lay.sp_ulysses, tp=lay.tp)
        assert shape.heads % (lay.sp_ulysses * lay.tp) == 0
        assert shape.kv_heads % lay.tp == 0 and shape.intermediate % lay.tp == 0
        assert lay.pp <= shape.layers
        assert layout_problem(shape, lay, 8192) is None
    # qwen2.5-7b has 28 heads and 4 KV heads: no ulysses 8, no tp 8 (and none asked for here at world 4).
    assert layout_problem(resolve_shape("qwen2.5-7b"), Layout(sp_ulysses=8), 8192) is not None
    # Every layout turns into a recipe the recipe loader accepts.
    for lay in layouts[:: max(1, len(layouts) // 25)]:
        recipe = recipe_for_layout(lay, model, 8192)
        assert recipe.process_count() == world
        assert layout_from_recipe(recipe, world).describe() == lay.describe()


def test_plan_ranks_fitting_layouts_first_and_max_length():
    shape = resolve_shape("llama-3-8b")
    hw = Hardware(gpus=8, gpu_mem_gib=80, host_mem_gib=1024, gpus_per_node=8)
    rows = plan(shape, 131072, hw, Calibration.gpu_default())
    fitting = [r for r in rows if r.fits]
    assert fitting and rows[: len(fitting)] == fitting
    assert [r.time.tokens_per_s for r in fitting] == sorted((r.time.tokens_per_s for r in fitting), reverse=True)
    length, best = max_length(shape, Hardware(gpus=1, gpu_mem_gib=80, host_mem_gib=1024, gpus_per_node=1),
                              Calibration.gpu_default(), granularity=65536)
    assert best is not None and best.fits and length >= 65536


def test_write_recipe_loads(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    assert cli_main(["plan", "tiny-llama", "--length", "4096", "--gpus", "2", "--cpu", "--gpu-mem-gib",
                     "1", "--baseline-gib", "0.5", "--top", "3", "--write-recipe", str(out)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    recipe = load_recipe(str(out))
    assert recipe.train.seq_len == 4096 and recipe.process_count() == 2
    # The planner's vocabulary for a tiny flavour is the one the run builds.
    from longtune.train.tokenizer import embedded_tokenizer

    assert resolve_shape("tiny-llama").vocab == len(embedded_tokenizer())


@pytest.mark.parametrize("args, says", [
    (["no-such-model", "--length", "4096"], "neither a local model dir"),
    (["llama-3-8b", "--length", "0"], "--length must be positive"),
    (["llama-3-8b"], "exactly one of --length"),
    (["llama-3-8b", "--length", "4096", "--nodes", "2"], "--nodes needs --gpus-per-node"),
    (["llama-3-8b", "--length", "4096", "--bogus"], "unrecognized arguments"),
    (["llama-3-8b", "--length", "4096", "--calibration", "/no/such.json"], "--calibration"),
    (["llama-3-8b", "--length", "4096", "--doc-fill", "1.5"], "--doc-fill must be in (0, 1]"),
])
def test_cli_bad_input_is_one_line(args, says, capsys):
    # In-process through the `longtune` entry (tests/test_cli.py runs `longtune plan` bad input as a subprocess).
    assert cli_main(["plan", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longtune: error: ") and says in lines[0], lines


def test_one_measured_run_within_15_percent():
    """A real 1-process, 6-step tiny run: its max RSS against the prediction with the measured baseline."""
    proc = run([PYTHON, str(REPO / "benchmarks" / "memory_model.py"), "--only", "plain-1k", "--malloc", "fixed"],
               check=False, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worst memory error" in proc.stdout
