"""Run under torchrun: sequence-parallel forward/backward of tiny HF models against the
single-process model, for many layouts in one launch. Rank 0 writes one JSON result per case.

    torchrun --nproc_per_node 4 tests/sp_parity_worker.py OUT_DIR

With LONGTUNE_TEST_KERNEL_FAKES=FAKE[,FAKE...] (names of tests/kernel_fakes.FAKES) it runs `fake_cases`
instead: the CUDA kernels through their CPU contract fakes, in bf16 against the single-process bf16 run;
LONGTUNE_TEST_KERNEL_MODES=MODE[,...] keeps only those layouts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kernel_fakes import clear_kernel_caches, install
from pytest import MonkeyPatch

from longtune.parallel.dims import ParallelDims, build_mesh
from longtune.parallel.sequence_chunks import apply_sequence_chunks
from longtune.parallel.sharding import unshard_sequence
from longtune.parallel.sp_attention import ATTN_IMPLEMENTATION
from longtune.parallel.sp_input import shard_micro_batch
from longtune.parallel.sp_rope import apply_length_aware_rope
from longtune.train.data import collate
from longtune.train.model import build_config, build_model, resolve_model_source

VOCAB = 300


def cases(world: int) -> list[dict]:
    base = []
    for family in ("tiny-llama", "tiny-qwen2", "tiny-mistral"):
        for kv in ((4, 1) if world == 4 else (2,)):
            base.append({"family": family, "kv_heads": kv})
    layouts = {2: [("ulysses", 2, 1, "zigzag"), ("ring", 1, 2, "ring"), ("zigzag", 1, 2, "zigzag")],
               4: [("ulysses", 4, 1, "zigzag"), ("ring", 1, 4, "ring"), ("zigzag", 1, 4, "zigzag"),
                   ("hybrid", 2, 2, "zigzag"), ("hybrid-ring", 2, 2, "ring")]}[world]
    out = []
    for name, uly, ring, impl in layouts:
        for b in base:
            out.append({**b, "mode": name, "ulysses": uly, "ring": ring, "impl": impl})
    # Edge cases on Llama with the widest layout of this world size.
    name, uly, ring, impl = layouts[-1]
    for edge in ("padding_only_shard", "ignored_labels_shard", "single_document"):
        out.append({"family": "tiny-llama", "kv_heads": 2, "mode": name, "ulysses": uly, "ring": ring,
                    "impl": impl, "edge": edge})
    # Ulysses on one unpadded document: attention after the all-to-all is a single kernel call.
    name, uly, ring, impl = layouts[0]
    out.append({"family": "tiny-llama", "kv_heads": 2, "mode": name, "ulysses": uly, "ring": ring, "impl": impl,
                "edge": "single_document_unpadded"})
    # Sequence-chunked layers (3 chunks: boundaries inside documents) on a contiguous ring, and under Ulysses
    # with one: each chunk's ring blocks gathered in forward, their dK/dV returned by an all-to-all in backward.
    chunked = {2: [("ring", 1, 2, "ring")], 4: [("ring", 1, 4, "ring"), ("hybrid-ring", 2, 2, "ring")]}[world]
    for name, uly, ring, impl in chunked:
        out.append({"family": "tiny-llama", "kv_heads": 2, "mode": name, "ulysses": uly, "ring": ring,
                    "impl": impl, "chunks": 3})
    # Every rope-extension method under every layout: the packed rows' longest document (91 tokens) passes the
    # original length (ROPE_ORIGINAL), so length-dependent ropes (dynamic, longrope) switch in the
    # single-process run while some shards alone would not.
    for method in ROPE_METHODS:
        for name, uly, ring, impl in layouts:
            out.append({"family": "tiny-llama", "kv_heads": 2, "mode": name, "ulysses": uly, "ring": ring,
                        "impl": impl, "rope": method})
    return out


def fake_cases(world: int, fakes: list[str], modes: list[str] | None = None) -> list[dict]:
    """Every layout of `world` through each kernel fake in bf16: packed GQA rows (a block covers part of the
    rows, so the LSE handed to the backward is a strided view), MQA, a padding-only shard, and Ulysses on one
    unpadded document (a single kernel call)."""
    layouts = {2: [("ulysses", 2, 1, "zigzag"), ("ring", 1, 2, "ring"), ("zigzag", 1, 2, "zigzag")],
               4: [("ulysses", 4, 1, "zigzag"), ("ring", 1, 4, "ring"), ("zigzag", 1, 4, "zigzag"),
                   ("hybrid", 2, 2, "zigzag"), ("hybrid-ring", 2, 2, "ring")]}[world]
    out = []
    for fake in fakes:
        for name, uly, ring, impl in layouts:
            if modes and name not in modes:
                continue
            base = {"family": "tiny-llama", "mode": name, "ulysses": uly, "ring": ring, "impl": impl,
                    "fake": fake, "dtype": "bfloat16"}
            out += [{**base, "kv_heads": 2}, {**base, "kv_heads": 1},
                    {**base, "kv_heads": 2, "edge": "padding_only_shard"}]
            if ring == 1:
                out.append({**base, "kv_heads": 2, "edge": "single_document_unpadded"})
    return out


def autocast(case: dict) -> contextlib.AbstractContextManager:
    """bf16 cases run as `model.dtype: bfloat16` trains: fp32 weights under CPU autocast."""
    bf16 = case.get("dtype") == "bfloat16"
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


ROPE_METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "abf")
ROPE_ORIGINAL = 64


def extend_config(config, method: str) -> None:
    """`config` extended by `method` from ROPE_ORIGINAL to 4 × that, as a recipe's `extension:` does."""
    from longtune.train.extension import apply_extension, plan_extension

    config.max_position_embeddings = ROPE_ORIGINAL
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    options = {"long_factor": [1.0 + 0.5 * i for i in range(head_dim // 2)]} if method == "longrope" else {}
    theta = 500000.0 if method == "abf" else None
    apply_extension(config, plan_extension(config, method, 4 * ROPE_ORIGINAL, rope_theta=theta, options=options))


def make_rows(case: dict) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    edge = case.get("edge")
    if edge == "single_document":
        return [{"input_ids": torch.randint(3, VOCAB, (97,), generator=g).tolist(), "doc_lens": [97]}]
    if edge == "single_document_unpadded":
        return [{"input_ids": torch.randint(3, VOCAB, (96,), generator=g).tolist(), "doc_lens": [96]}]
    # Packed rows whose documents cross shard boundaries; 203 divides by nothing useful.
    rows = [{"input_ids": torch.randint(3, VOCAB, (203,), generator=g).tolist(), "doc_lens": [50, 91, 7, 55]}]
    if edge == "padding_only_shard":
        rows.append({"input_ids": torch.randint(3, VOCAB, (9,), generator=g).tolist(), "doc_lens": [4, 5]})
    if edge == "ignored_labels_shard":
        rows[0]["loss_mask"] = [1] * 60 + [0] * 143
    return rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_case(case: dict, rank: int, world: int) -> dict:
    source = resolve_model_source(case["family"])
    config = build_config(source, VOCAB, {"num_key_value_heads": case["kv_heads"]})
    if "rope" in case:
        extend_config(config, case["rope"])
    reference = build_model(source, config, device="cpu", attn_implementation="sdpa", seed=11)
    sp_model = copy.deepcopy(reference)
    sp_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    # bf16: compared with the one-process bf16 run; its distance to fp32 is the noise floor reported with it.
    fp32_reference = copy.deepcopy(reference) if case.get("dtype") == "bfloat16" else None

    batch = collate(make_rows(case), pad_id=0, document_masking=True)
    count = (batch.labels != -100).sum()

    def one_process(model) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(case if model is reference else {}):
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), reduction="sum") / count
        loss.backward()
        return logits.detach().float(), loss.detach()

    ref_logits, ref_loss = one_process(reference)
    noise = {}
    if fp32_reference is not None:
        fp32_logits, fp32_loss = one_process(fp32_reference)
        noise = {"noise_logits_rel": rel(ref_logits, fp32_logits),
                 "noise_loss_rel": abs((ref_loss - fp32_loss).item()) / abs(fp32_loss.item()),
                 "noise_grad_rel": max(rel(a.grad, b.grad) for a, b in
                                       zip(reference.parameters(), fp32_reference.parameters(), strict=True))}

    dims = ParallelDims(world, dp=1, sp_ring=case["ring"], sp_ulysses=case["ulysses"])
    mesh = build_mesh(dims, "cpu")
    groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    if os.environ.get("LONGTUNE_TEST_SHARD_LOCAL_ROPE") != "1":  # set: the unfixed behaviour, to show it fail
        apply_length_aware_rope(sp_model, groups)
    chunks = case.get("chunks", 1)
    apply_sequence_chunks(sp_model.model.layers, chunks, None, offload_inputs=False)
    real = batch.position_ids >= 0  # every token of these rows is a token (padding included)
    layout = "contiguous" if case["impl"] == "ring" else "zigzag"
    shard = shard_micro_batch(batch.input_ids, batch.labels, batch.position_ids, real, dims=dims, rank=rank,
                              layout=layout, pad_id=0, groups=groups, kernel=case.get("kernel"), chunks=chunks)
    with autocast(case):
        logits = sp_model(input_ids=shard.input_ids, position_ids=shard.position_ids, use_cache=False,
                          sp_context=shard.context).logits.float()
    local_sum = F.cross_entropy(logits.flatten(0, 1), shard.labels.flatten(), reduction="sum")
    (local_sum / count).backward()

    total = local_sum.detach().clone()
    dist.all_reduce(total)
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits.detach().contiguous())
    grid = [[gathered[dims.coordinate(r, "sp_ring") * 0 + r] for r in range(world)
             if dims.coordinate(r, "sp_ring") == ring_rank] for ring_rank in range(dims.sp_ring)]
    full = unshard_sequence(grid, layout, chunks=chunks)[:, : batch.input_ids.shape[1]]
    worst_grad, worst_name, finite = 0.0, "", True
    for (name, p_ref), (_, p_sp) in zip(reference.named_parameters(), sp_model.named_parameters(), strict=True):
        grad = p_sp.grad.clone()
        dist.all_reduce(grad)
        finite &= bool(torch.isfinite(grad).all())
        r = rel(grad, p_ref.grad)
        if r > worst_grad:
            worst_grad, worst_name = r, name
    return {"logits_rel": rel(full, ref_logits.detach()), "loss_rel": abs((total / count - ref_loss).item())
            / abs(ref_loss.item()), "grad_rel": worst_grad, "grad_worst": worst_name,
            "finite": finite and bool(torch.isfinite(logits).all()), "loss": ref_loss.item(), **noise}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    fakes = os.environ.get("LONGTUNE_TEST_KERNEL_FAKES")
    modes = os.environ.get("LONGTUNE_TEST_KERNEL_MODES")
    todo = fake_cases(world, fakes.split(","), modes and modes.split(",")) if fakes else cases(world)
    for case in todo:
        key = "-".join(f"{k}={v}" for k, v in case.items())
        patch = MonkeyPatch()
        try:
            kernel = install(case["fake"], patch) if "fake" in case else None
            result = run_case({**case, "kernel": kernel}, rank, world)
        except Exception:  # a failing case must not hide the others
            result = {"error": traceback.format_exc()}
        finally:
            patch.undo()
            clear_kernel_caches()
        if rank == 0:
            (out_dir / f"w{world}-{key}.json").write_text(json.dumps({"case": case, **result}))
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
