"""Sequence parallelism: the pieces in isolation, then real gloo processes (2 and 4 ranks) whose outputs,
loss and every parameter gradient equal the single-process HF model within 1e-5 relative (fp32)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from sp_parity_worker import cases

from conftest import REPO, free_port, run, subprocess_env
from longtune.parallel.attention_merge import merge_partial_attention
from longtune.parallel.kernels import get_kernel
from longtune.parallel.ring_attention import RingAttention, RingPlan
from longtune.parallel.sharding import (
    document_bounds,
    layout_chunks,
    pad_to_multiple,
    padding_multiple,
    shard_sequence,
    unshard_sequence,
)
from longtune.parallel.ulysses import replicate_kv_heads

TOL = 1e-5


def test_merge_of_two_blocks_equals_softmax_over_both():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 9, 8, dtype=torch.float64), \
        torch.randn(3, 9, 8, dtype=torch.float64)
    scores = q @ k.transpose(-1, -2)
    full = torch.softmax(scores, -1) @ v

    def part(sl):
        s = scores[..., sl]
        return torch.softmax(s, -1) @ v[:, sl], torch.logsumexp(s, -1)

    empty_out, empty_lse = torch.zeros(3, 5, 8, dtype=torch.float64), torch.full((3, 5), -math.inf,
                                                                                  dtype=torch.float64)
    out, lse = merge_partial_attention(empty_out, empty_lse, *part(slice(0, 4)))
    out, lse = merge_partial_attention(out, lse, *part(slice(4, 9)))
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 1), (4, 1), (2, 2), (1, 4), (3, 2)])
def test_shard_round_trip(layout, ring, ulysses):
    length = padding_multiple(layout, ring, ulysses) * 3
    x = torch.arange(2 * length).reshape(2, length)
    shards = [[shard_sequence(x, layout, ring, r, ulysses, u) for u in range(ulysses)] for r in range(ring)]
    assert all(s.shape[1] == length // (ring * ulysses) for row in shards for s in row)
    torch.testing.assert_close(unshard_sequence(shards, layout), x)


def test_zigzag_balances_causal_work():
    # Rank r holds chunks r and 2N-1-r: the pairs sum to the same total for every rank.
    sums = {r: sum(c.start for c in layout_chunks("zigzag", 4, r, 64)) for r in range(4)}
    assert len(set(sums.values())) == 1


def test_indivisible_length_is_padded_with_ignored_labels_as_a_new_document():
    ids, labels, pos = torch.ones(1, 10, dtype=torch.long), torch.ones(1, 10, dtype=torch.long), \
        torch.arange(10)[None]
    ids2, labels2, pos2, extra = pad_to_multiple(ids, labels, pos, 8, pad_id=0)
    assert extra == 6 and ids2.shape == (1, 16)
    assert labels2[0, 10:].eq(-100).all() and pos2[0, 10:].tolist() == list(range(6))
    assert document_bounds(pos2) == [[(0, 10), (10, 16)]]
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard_sequence(ids, "zigzag", 2, 0, 2, 0)


def test_kv_head_replication_is_minimal():
    assert replicate_kv_heads(kv_heads=8, q_heads=32, degree=4) == 1
    assert replicate_kv_heads(kv_heads=2, q_heads=8, degree=4) == 2
    assert replicate_kv_heads(kv_heads=1, q_heads=4, degree=4) == 4
    with pytest.raises(ValueError, match="6 query heads are not divisible by the Ulysses degree 4"):
        replicate_kv_heads(kv_heads=2, q_heads=6, degree=4)


def test_local_document_masked_attention_matches_a_dense_mask():
    """A ring of one rank is document-masked attention without an L×L mask (GQA, fp32 vs fp64)."""
    torch.manual_seed(0)
    b, h, hkv, length, d = 2, 4, 2, 37, 16
    q = torch.randn(b, h, length, d, requires_grad=True)
    k, v = (torch.randn(b, hkv, length, d, requires_grad=True) for _ in range(2))
    pos = torch.tensor([list(range(10)) + list(range(20)) + list(range(7)), list(range(37))])
    bounds = document_bounds(pos)
    plan = RingPlan("contiguous", 1, 0, length, tuple(tuple(x) for x in bounds), d ** -0.5,
                    get_kernel(None, torch.device("cpu")))
    out = RingAttention.apply(q, k, v, plan)
    mask = torch.zeros(b, 1, length, length, dtype=torch.bool)
    for row, docs in enumerate(bounds):
        for s, e in docs:
            mask[row, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd.repeat_interleave(2, 1),
                                                           vd.repeat_interleave(2, 1), attn_mask=mask,
                                                           scale=d ** -0.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    for got, want in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=5e-6)


def _key_coverage(plan: RingPlan, call_list, q_rank: int, k_rank: int) -> torch.Tensor:
    """How often each (global query, global key) pair is computed by the given kernel calls."""
    q_pos = torch.cat([torch.arange(c.start, c.start + c.length) for c in plan.chunks(q_rank)])
    k_pos = torch.cat([torch.arange(c.start, c.start + c.length) for c in plan.chunks(k_rank)])
    count = torch.zeros(plan.seq_len, plan.seq_len, dtype=torch.int64)
    for p in call_list:
        for i in range(p.q_start, p.q_end):
            for j in range(p.k_start, p.k_end):
                if not p.causal or j - p.k_start <= i - p.q_start:
                    count[q_pos[i], k_pos[j]] += 1
    return count


@pytest.mark.parametrize("layout,world", [("zigzag", 2), ("zigzag", 4), ("contiguous", 4)])
@pytest.mark.parametrize("docs", [((0, 64),), ((0, 5), (5, 30), (30, 31), (31, 64))])
def test_joined_kernel_calls_cover_each_causal_pair_once(layout, world, docs):
    """`RingPlan.calls` joins pieces into fewer kernel calls; every query/key pair inside a document with the
    key not after the query is still computed exactly once, and nothing else is."""
    length = 64
    plan = RingPlan(layout, world, 0, length, (docs,), 1.0, get_kernel(None, torch.device("cpu")))
    doc_of = torch.zeros(length, dtype=torch.int64)
    for i, (s, e) in enumerate(docs):
        doc_of[s:e] = i
    pos = torch.arange(length)
    wanted = ((doc_of[:, None] == doc_of[None, :]) & (pos[None, :] <= pos[:, None])).long()
    total, n_calls, n_pieces = torch.zeros_like(wanted), 0, 0
    for q_rank in range(world):
        for k_rank in range(world):
            calls = plan.calls(q_rank, k_rank, 0)
            total += _key_coverage(plan, calls, q_rank, k_rank)
            n_calls, n_pieces = n_calls + len(calls), n_pieces + len(plan.pieces(q_rank, k_rank, 0))
            if layout == "zigzag" and len(docs) == 1 and q_rank != k_rank:
                assert len(calls) == 1  # a peer's two chunks are one block for the rank's queries
    assert torch.equal(total, wanted)
    assert n_calls < n_pieces if layout == "zigzag" else n_calls <= n_pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_causal_document_is_one_kernel_call(dtype):
    """Batch 1, one document, no ring (Ulysses after its all-to-all): the kernel's own result is returned,
    equal to the general path's (the same row as the first of a batch of two) and to a float64 reference."""
    torch.manual_seed(1)
    h, hkv, length, d = 4, 2, 40, 16
    kernel = get_kernel(None, torch.device("cpu"))
    plan_one = RingPlan("contiguous", 1, 0, length, (((0, length),),), d ** -0.5, kernel)
    plan_two = RingPlan("contiguous", 1, 0, length, (((0, length),), ((0, 7), (7, length))), d ** -0.5, kernel)
    q = torch.randn(2, h, length, d, dtype=dtype)
    k, v = (torch.randn(2, hkv, length, d, dtype=dtype) for _ in range(2))
    grad = torch.randn(1, h, length, d, dtype=dtype)
    results = []
    for plan, rows in ((plan_one, 1), (plan_two, 2)):
        leaves = [t[:rows].clone().requires_grad_() for t in (q, k, v)]
        out = RingAttention.apply(*leaves, plan)
        assert out.dtype == dtype
        out[:1].backward(grad)
        results.append([out[:1], *(t.grad[:1] for t in leaves)])
    qd, kd, vd = (t[:1].double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1),
                                                           is_causal=True, scale=d ** -0.5)
    ref.backward(grad.double())
    tol = {"rtol": 0, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 3e-2}
    for single, general, want in zip(results[0], results[1], (ref, qd.grad, kd.grad, vd.grad), strict=True):
        torch.testing.assert_close(single.double(), want, **tol)
        torch.testing.assert_close(single.double(), general.double(), **tol)


def test_cuda_kernels_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("this check is about CPU-only machines")  # the GPU path is checked on GPU machines
    with pytest.raises(ValueError, match="not available on cpu"):
        get_kernel("torch_cuda_flash", torch.device("cpu"))
    assert get_kernel(None, torch.device("cpu")).name == "torch_cpu"


# -- multi-process parity ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_results(tmp_path_factory) -> dict[int, dict[str, dict]]:
    results = {}
    for world in (2, 4):
        out = tmp_path_factory.mktemp(f"sp{world}")
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
             "--master_port", str(free_port()), str(REPO / "tests" / "sp_parity_worker.py"), str(out)],
            env=subprocess_env(), timeout=300)
        loaded = [json.loads(p.read_text()) for p in out.glob("*.json")]
        results[world] = {repr(r["case"]): r for r in loaded}
    return results


def _case_id(world: int, case: dict) -> str:
    return f"{world}ranks-" + "-".join(str(v) for v in case.values())


ALL_CASES = [(w, c) for w in (2, 4) for c in cases(w)]


@pytest.mark.multiproc
@pytest.mark.parametrize("world,case", ALL_CASES, ids=[_case_id(w, c) for w, c in ALL_CASES])
def test_sequence_parallel_equals_single_process(parity_results, world, case):
    result = parity_results[world].get(repr(case))
    assert result is not None, f"the worker wrote no result for {case}"
    assert "error" not in result, result.get("error")
    assert result["finite"], "NaN or Inf in logits or gradients"
    assert result["logits_rel"] <= TOL, result
    assert result["loss_rel"] <= TOL, result
    assert result["grad_rel"] <= TOL, f"{result['grad_worst']}: {result['grad_rel']:.2e}"
