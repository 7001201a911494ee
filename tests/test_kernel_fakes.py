"""The CUDA block kernels on a CPU machine, through contract fakes of the APIs they call (tests/kernel_fakes.py):
each kernel against a float64 reference, the ring's block-wise backward through each fake, sequence parallelism
through the fakes on real gloo processes (bf16 against the one-process bf16 run), the float32 kernel for GPUs,
and the kernel checks the launcher runs before any worker starts."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from kernel_fakes import FAKES, clear_kernel_caches, install, sdpa_flash_backward
from sp_parity_worker import fake_cases

from conftest import REPO, free_port, run, subprocess_env
from longtune.parallel import kernels
from longtune.parallel.kernels import get_kernel, kernel_problem
from longtune.parallel.ring_attention import RingAttention, RingPlan
from longtune.parallel.sharding import document_bounds

BF16_ATOL = 3e-2  # bf16 inputs and outputs (8 mantissa bits), fp32 accumulation; values are O(1)


@pytest.fixture
def patch():
    mp = pytest.MonkeyPatch()
    clear_kernel_caches()
    yield mp
    mp.undo()
    clear_kernel_caches()


def _inputs(dtype, b=2, h=4, hkv=2, length=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, length, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _reference(q, k, v, causal, grad, mask=None):
    """float64 sdpa: (out, dq, dk, dv) with k/v heads expanded and their grads folded back."""
    groups = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        qd, kd.repeat_interleave(groups, 1), vd.repeat_interleave(groups, 1), attn_mask=mask,
        is_causal=causal and mask is None, scale=q.shape[-1] ** -0.5)
    out.backward(grad.double())
    return out, qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fake", FAKES)
def test_each_cuda_kernel_through_its_fake_matches_float64(patch, fake, causal):
    kernel = get_kernel(install(fake, patch), "cpu", torch.bfloat16, 16)
    q, k, v = _inputs(torch.bfloat16)
    scale = q.shape[-1] ** -0.5
    out, lse = kernel.forward(q, k, v, causal, scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    grad = torch.randn_like(out)
    dq, dk, dv = kernel.backward(grad, q, k, v, out, lse, causal, scale)
    assert dk.shape == k.shape and dv.shape == v.shape
    want = _reference(q, k, v, causal, grad)
    for got, ref in zip((out, dq, dk, dv), want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=BF16_ATOL)


@pytest.mark.parametrize("fake", FAKES)
def test_ring_backward_through_each_fake_with_packed_documents(patch, fake):
    """A ring of one rank over packed rows: blocks cover part of the rows with 4 heads, so the LSE rows
    handed to the kernel's backward are a strided view (the real kernels read them by raw pointer)."""
    kernel = get_kernel(install(fake, patch), "cpu", torch.bfloat16, 16)
    b, h, hkv, length, d = 2, 4, 2, 40, 16
    q, k, v = (t.requires_grad_() for t in _inputs(torch.bfloat16, b, h, hkv, length, d, seed=1))
    pos = torch.tensor([list(range(10)) + list(range(23)) + list(range(7)), list(range(40))])
    bounds = tuple(tuple(x) for x in document_bounds(pos))
    out = RingAttention.apply(q, k, v, RingPlan("contiguous", 1, 0, length, bounds, d ** -0.5, kernel))
    grad = torch.randn_like(out)
    out.backward(grad)
    mask = torch.zeros(b, 1, length, length, dtype=torch.bool)
    for row, docs in enumerate(bounds):
        for s, e in docs:
            mask[row, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    want = _reference(q, k, v, True, grad, mask)
    for got, ref in zip((out, q.grad, k.grad, v.grad), want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=BF16_ATOL)


def test_fakes_refuse_what_the_real_kernels_refuse(patch):
    install("flash_attn-2.8.3", patch)
    fa = sys.modules["flash_attn"].flash_attn_interface
    q, k, v = (t.transpose(1, 2) for t in _inputs(torch.bfloat16))
    common = {"causal": True, "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
              "return_softmax": False}
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        fa._flash_attn_forward(q.float(), k.float(), v.float(), 0.0, 0.25, **common)
    odd = [t[..., :12] for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="multiple of 8"):
        fa._flash_attn_forward(*odd, 0.0, 0.25, **common)
    wide = [torch.cat([t] * 17, dim=-1) for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="at most 256"):
        fa._flash_attn_forward(*wide, 0.0, 0.25, **common)
    out, lse, _, _ = fa._flash_attn_forward(q, k, v, 0.0, 0.25, **common)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="softmax_lse must be a contiguous"):
        fa._flash_attn_backward(out, q, k, v, out, lse[:, :, 1:], *grads, 0.0, 0.25, True, -1, -1, 0.0, None, False)


def test_the_old_calls_fail_on_the_fakes(patch):
    """What kernels.py used to send: flash-attn 2.7's keyword form to 2.6, and a defined (empty) cum_seq_q to
    torch's backward, which then takes its varlen path."""
    install("flash_attn-2.6.3", patch)
    fa = sys.modules["flash_attn"].flash_attn_interface
    q, k, v = (t.transpose(1, 2) for t in _inputs(torch.bfloat16))
    with pytest.raises(TypeError, match="window_size_left"):
        fa._flash_attn_forward(q, k, v, 0.0, 0.25, causal=True, window_size_left=-1, window_size_right=-1,
                               softcap=0.0, alibi_slopes=None, return_softmax=False)
    q, k, v = _inputs(torch.bfloat16)
    lse = torch.zeros(q.shape[:3])
    empty = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="varlen"):
        sdpa_flash_backward(q, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), q, lse, empty, empty, 24, 24,
                            0.0, True, torch.empty(0), torch.empty(0), scale=0.25)


def test_math_kernel_matches_float64_in_row_chunks(monkeypatch):
    """torch_math (float32 on GPUs) walks the query rows in chunks; causal is top-left like torch_cpu."""
    monkeypatch.setattr(kernels, "_SCORE_ELEMENTS", 2 * 4 * 24 * 5)  # chunks of 5 rows
    kernel = kernels.KERNELS["torch_math"]
    q, k, v = _inputs(torch.float32)
    for causal in (True, False):
        out, lse = kernel.forward(q, k, v, causal, q.shape[-1] ** -0.5)
        grad = torch.randn_like(out)
        got = (out, *kernel.backward(grad, q, k, v, out, lse, causal, q.shape[-1] ** -0.5))
        for g, ref in zip(got, _reference(q, k, v, causal, grad), strict=True):
            torch.testing.assert_close(g.double(), ref, rtol=0, atol=2e-6)


def test_kernel_choice(patch, caplog):
    assert get_kernel(None, "cpu", torch.float32, 32).name == "torch_cpu"
    assert get_kernel(None, "cuda", torch.bfloat16, 32).name == "torch_cuda_flash"  # flash-attn not installed
    with caplog.at_level(logging.INFO, logger="longtune"):
        for _ in range(3):  # resolved once: one log line
            assert get_kernel(None, "cuda", torch.float32, 32).name == "torch_math"
    assert [r.message.split(";")[0] for r in caplog.records] == ["attention kernel: torch_math for float32 on cuda "
                                                                 "(head dim 32)"]
    assert get_kernel(None, "cuda", torch.bfloat16, 12).name == "torch_math"
    install("flash_attn-2.6.3", patch)
    assert get_kernel(None, "cuda", torch.bfloat16, 32).name == "flash_attn"


def test_kernel_problems_name_the_fix():
    assert kernel_problem(None, "cuda", torch.float32, 12) is None
    assert "unknown attention kernel 'flash'" in kernel_problem("flash", "cuda", torch.bfloat16)
    if kernels.importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn package is not installed" in kernel_problem("flash_attn", "cuda", torch.bfloat16)
    assert "not available on cpu" in kernel_problem("torch_cuda_flash", "cpu", torch.bfloat16)
    assert "takes bfloat16 or float16, not float32" in kernel_problem("torch_cuda_flash", "cuda", "float32")
    assert "the model's is 12" in kernel_problem("torch_cuda_flash", "cuda", "bfloat16", 12)
    assert kernel_problem("torch_cuda_flash", "cuda", "bfloat16", 128) is None


def test_launcher_preflight_refuses_a_kernel_that_cannot_run():
    """`longtune train` runs this before starting any worker: one error line instead of one traceback per rank."""
    from longtune.train.model_checks import preflight_model
    from longtune.train.recipe import RecipeError, load_recipe

    recipe = load_recipe("tiny-smoke", ["parallel.sp.kernel=flash_attn", "parallel.sp.ulysses=2"])
    with pytest.raises(RecipeError, match="parallel.sp.kernel flash_attn"):
        preflight_model(recipe, 2)
    recipe = load_recipe("tiny-smoke", ["parallel.sp.kernel=torch_cuda_flash", "parallel.sp.ring=2"])
    with pytest.raises(RecipeError, match="torch_cuda_flash is not available on cpu|not float32"):
        preflight_model(recipe, 2)
    # One process: the kernel is not used, but a kernel the recipe names and this machine lacks is still refused.
    with pytest.raises(RecipeError, match="parallel.sp.kernel flash_attn"):
        preflight_model(load_recipe("tiny-smoke", ["parallel.sp.kernel=flash_attn"]), 1)


# -- multi-process parity through the fakes ---------------------------------------------------------------

def _run_fake_parity(tmp_path, world: int, fakes: list[str], modes: list[str] | None = None) -> dict[str, dict]:
    env = subprocess_env(LONGTUNE_TEST_KERNEL_FAKES=",".join(fakes), LONGTUNE_TEST_KERNEL_MODES=",".join(modes or []))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
         str(free_port()), str(REPO / "tests" / "sp_parity_worker.py"), str(tmp_path)], env=env, timeout=600)
    results = {repr(r["case"]): r for r in (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))}
    wanted = fake_cases(world, fakes, modes)
    assert sorted(results) == sorted(map(repr, wanted))
    return results


def assert_within_bf16_noise(result: dict) -> None:
    """SP in bf16 against one process in bf16: both are bf16 roundings of the same fp32 computation, so their
    distance is at most about twice the one-process bf16-vs-fp32 distance (its noise floor, measured in the same
    case); a wrong block (mask, LSE, merge) is off by O(1). The 1e-3 floor covers a case whose noise is tiny."""
    assert "error" not in result, result.get("error")
    assert result["finite"], "NaN or Inf in logits or gradients"
    for what in ("logits", "loss", "grad"):
        bound = 2 * result[f"noise_{what}_rel"] + 1e-3
        assert result[f"{what}_rel"] <= bound, f"{what}: {result[f'{what}_rel']:.2e} > {bound:.2e} {result}"


@pytest.mark.multiproc
def test_sequence_parallel_through_fakes_matches_one_process_bf16(tmp_path):
    """Two ranks, zigzag ring and Ulysses, through flash-attn 2.6's fake (the others: in-process above, and
    every layout under -m slow)."""
    for result in _run_fake_parity(tmp_path, 2, ["flash_attn-2.6.3"], ["zigzag", "ulysses"]).values():
        assert_within_bf16_noise(result)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_through_every_fake_matches_one_process_bf16(tmp_path, world):
    results = _run_fake_parity(tmp_path, world, list(FAKES))
    for result in results.values():
        assert_within_bf16_noise(result)
