"""Run under torchrun: sequence-parallel forward/backward of tiny HF models against the
single-process model, for many layouts in one launch. Rank 0 writes one JSON result per case.

    torchrun --nproc_per_node 4 tests/sp_parity_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtune.parallel.dims import ParallelDims, build_mesh
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
    # Every rope-extension method under every layout: the packed rows' longest document (91 tokens) passes the
    # original length (ROPE_ORIGINAL), so length-dependent ropes (dynamic, longrope) switch in the
    # single-process run while some shards alone would not.
    for method in ROPE_METHODS:
        for name, uly, ring, impl in layouts:
            out.append({"family": "tiny-llama", "kv_heads": 2, "mode": name, "ulysses": uly, "ring": ring,
                        "impl": impl, "rope": method})
    return out


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

    batch = collate(make_rows(case), pad_id=0, document_masking=True)
    count = (batch.labels != -100).sum()
    ref_logits = reference(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), batch.labels.flatten(), reduction="sum") / count
    ref_loss.backward()

    dims = ParallelDims(world, dp=1, sp_ring=case["ring"], sp_ulysses=case["ulysses"])
    mesh = build_mesh(dims, "cpu")
    groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    if os.environ.get("LONGTUNE_TEST_SHARD_LOCAL_ROPE") != "1":  # set: the unfixed behaviour, to show it fail
        apply_length_aware_rope(sp_model, groups)
    real = batch.position_ids >= 0  # every token of these rows is a token (padding included)
    layout = "contiguous" if case["impl"] == "ring" else "zigzag"
    shard = shard_micro_batch(batch.input_ids, batch.labels, batch.position_ids, real, dims=dims, rank=rank,
                              layout=layout, pad_id=0, groups=groups)
    logits = sp_model(input_ids=shard.input_ids, position_ids=shard.position_ids, use_cache=False,
                      sp_context=shard.context).logits
    local_sum = F.cross_entropy(logits.flatten(0, 1), shard.labels.flatten(), reduction="sum")
    (local_sum / count).backward()

    total = local_sum.detach().clone()
    dist.all_reduce(total)
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits.detach().contiguous())
    grid = [[gathered[dims.coordinate(r, "sp_ring") * 0 + r] for r in range(world)
             if dims.coordinate(r, "sp_ring") == ring_rank] for ring_rank in range(dims.sp_ring)]
    full = unshard_sequence(grid, layout)[:, : batch.input_ids.shape[1]]
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
            "finite": finite and bool(torch.isfinite(logits).all()), "loss": ref_loss.item()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    for case in cases(world):
        key = "-".join(f"{k}={v}" for k, v in case.items())
        try:
            result = run_case(case, rank, world)
        except Exception:  # a failing case must not hide the others
            result = {"error": traceback.format_exc()}
        if rank == 0:
            (out_dir / f"w{world}-{key}.json").write_text(json.dumps({"case": case, **result}))
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
