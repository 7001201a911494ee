"""CPU stand-ins for the CUDA attention entry points that `longtune.parallel.kernels` calls, so the GPU path
runs on a machine without a GPU. Test-only: `install` puts them in place with a `pytest.MonkeyPatch`.

Each fake has the signature and return tuple of the real entry point in the version named, raises where the
real kernel raises (with its message), and also raises where the real kernel would silently read wrong memory
(the LSE is read by raw pointer as a dense `[b, h, seqlen_q]` array, unchecked). It computes in fp32 on the
CPU, returns outputs in the input dtype and the LSE in fp32, as the real kernels do. Dropout, softcap, ALiBi
and sliding windows are not modelled (longtune never uses them): they raise NotImplementedError.

Sources (signatures, returns, checks):
- flash-attn 2.6.3, 2.7.4, 2.8.3: `flash_attn/flash_attn_interface.py` (Dao-AILab/flash-attention at those
  tags) for the Python entry points; `csrc/flash_attn/flash_api.cpp` (`mha_fwd`, `mha_bwd`) for the checks.
  2.6 takes `window_size=(left, right)` and returns 8 values from the forward and `(dq, dk, dv, softmax_d)`
  from the backward; 2.7 (`torch.library.custom_op`) takes `window_size_left/right`, returns
  `(out_padded, softmax_lse, S_dmask, rng_state)` and the backward returns `softmax_d`; 2.8 the same with
  `out` first. From 2.7 the Python autograd functions pad the head dim to a multiple of 8 before calling
  the private forward, whose C++ then requires it; 2.6's C++ forward pads itself. Every backward requires it.
  Causal attention with seqlen_q != seqlen_k is aligned bottom-right (flash-attn >= 2.1).
- torch: `aten/src/ATen/native/native_functions.yaml` (`_scaled_dot_product_flash_attention`,
  `_scaled_dot_product_flash_attention_backward`, schemas as in torch 2.6-2.13) and
  `aten/src/ATen/native/transformers/cuda/attention.cu` / `attention_backward.cu`: the dense forward returns
  undefined `cum_seq_q`/`cum_seq_k` (None in Python) and the backward takes the varlen path (`mha_varlen_bwd`,
  `[total, H, D]` inputs) whenever `cum_seq_q` is defined. torch's flash copy (FA2) has the same dtype,
  head-dim and LSE rules.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import sys
import types

import pytest
import torch

from longtune.parallel import kernels

FLASH_ATTN_VERSIONS = ("2.6.3", "2.7.4", "2.8.3")
FAKES = ("torch_cuda_flash", *(f"flash_attn-{v}" for v in FLASH_ATTN_VERSIONS))
HALF = (torch.float16, torch.bfloat16)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _unmodelled(dropout_p: float, softcap: float = 0.0, alibi_slopes=None, window=(-1, -1)) -> None:
    if dropout_p or softcap or alibi_slopes is not None or tuple(window) != (-1, -1):
        raise NotImplementedError("kernel fake: dropout, softcap, ALiBi and windows are not modelled")


def _maybe_contiguous(x):
    """flash-attn's Python wrappers: only a tensor whose last dim is strided is copied."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _round_multiple(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# -- the checks of mha_fwd / mha_bwd (q, k, v: [b, s, h, d]) --------------------------------------------

def _check_inputs(q, k, v, *, pass_name: str, head_dim_multiple: int) -> tuple[int, int, int, int, int, int]:
    _check(q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    for t in (q, k, v):
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be [batch, seqlen, heads, head_dim]")
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    _check(b > 0, "batch size must be positive")
    _check(d <= 256, f"FlashAttention {pass_name} only supports head dimension at most 256")
    _check(d % head_dim_multiple == 0, "head_size should be a multiple of 8" if pass_name == "backward" else
           "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(h % hk == 0, "Number of heads in key/value must divide number of heads in query")
    _check(tuple(k.shape) == (b, sk, hk, d), "key must have shape (batch_size, seqlen_k, num_heads_k, head_size)")
    _check(tuple(v.shape) == (b, sk, hk, d), "value must have shape (batch_size, seqlen_k, num_heads_k, head_size)")
    return b, sq, sk, h, hk, d


def _check_lse(lse: torch.Tensor, b: int, h: int, sq: int) -> None:
    """Unchecked by the real kernels, which read it by raw pointer: a view gives silently wrong gradients."""
    _check(lse.dtype == torch.float32 and tuple(lse.shape) == (b, h, sq) and lse.is_contiguous(),
           f"kernel fake: softmax_lse must be a contiguous fp32 [{b}, {h}, {sq}] tensor, got {lse.dtype} "
           f"{tuple(lse.shape)} strides {lse.stride()} (the real kernel reads it by raw pointer, unchecked: "
           "wrong gradients)")


def _check_grads(dq, dk, dv, q, k) -> None:
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, k)):
        _check(g.dtype == like.dtype, f"{name} must have the same dtype as q")
        _check(g.stride(-1) == 1, f"{name} must have contiguous last dimension")
        _check(g.shape == like.shape, f"{name} must have shape {tuple(like.shape)}")


# -- the math, fp32 on the CPU ----------------------------------------------------------------------------

def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """[b, h, sq, sk] fp32 scores; causal aligned bottom-right as flash-attn >= 2.1 (key j > i + sk - sq masked)."""
    groups = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(groups, dim=2)) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(mask, float("-inf"))
    return s


@torch.autocast("cpu", enabled=False)  # a CUDA kernel is not subject to the caller's CPU autocast
def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[b, sq, h, d]` in q's dtype, lse `[b, h, sq]` fp32)."""
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    groups = q.shape[2] // k.shape[2]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float().repeat_interleave(groups, dim=2))
    return out.to(q.dtype), lse.contiguous()


@torch.autocast("cpu", enabled=False)
def _backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) fp32 from the given out and lse (not recomputed), and softmax_d = rowsum(dout · out)."""
    groups = q.shape[2] // k.shape[2]
    ke, ve = k.float().repeat_interleave(groups, dim=2), v.float().repeat_interleave(groups, dim=2)
    p = torch.exp(_scores(q, k, causal, scale) - lse[..., None])
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [b, h, sq]
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout.float())
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", dout.float(), ve) - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    fold = lambda g: g.unflatten(2, (k.shape[2], groups)).sum(3)  # noqa: E731
    return dq, fold(dk), fold(dv), delta


def _softmax_d(delta: torch.Tensor) -> torch.Tensor:
    b, h, sq = delta.shape
    padded = torch.zeros(b, h, _round_multiple(sq, 128))
    padded[..., :sq] = delta
    return padded


# -- flash-attn ------------------------------------------------------------------------------------------

def _fa_forward(version, q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, return_softmax):
    _unmodelled(dropout_p, softcap, alibi_slopes, window)
    if return_softmax:
        raise NotImplementedError("kernel fake: return_softmax is not modelled")
    q, k, v = (_maybe_contiguous(x) for x in (q, k, v))
    _check_inputs(q, k, v, pass_name="forward", head_dim_multiple=1 if version < (2, 7) else 8)
    out, lse = _forward(q, k, v, causal, softmax_scale)
    return out, lse


def _fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window, softcap,
                 alibi_slopes):
    _unmodelled(dropout_p, softcap, alibi_slopes, window)
    dout, q, k, v, out = (_maybe_contiguous(x) for x in (dout, q, k, v, out))
    b, sq, _, h, _, _ = _check_inputs(q, k, v, pass_name="backward", head_dim_multiple=8)
    _check(out.dtype == q.dtype, "query and out must have the same dtype")
    _check(dout.dtype == q.dtype, "query and dout must have the same dtype")
    _check(out.stride(-1) == 1 and dout.stride(-1) == 1, "out and dout must have contiguous last dimension")
    _check(out.shape == q.shape and dout.shape == q.shape, "out and dout must have the shape of q")
    _check_lse(softmax_lse, b, h, sq)
    _check_grads(dq, dk, dv, q, k)
    g_q, g_k, g_v, delta = _backward(dout, q, k, v, out, softmax_lse, causal, softmax_scale)
    dq.copy_(g_q)
    dk.copy_(g_k)
    dv.copy_(g_v)
    return _softmax_d(delta)


def _rng_state() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int64)


def _flash_attn_interface(version: str) -> types.ModuleType:
    """`flash_attn.flash_attn_interface` of `version`, with its private forward / backward."""
    ver = tuple(int(x) for x in version.split(".")[:2])
    module = types.ModuleType("flash_attn.flash_attn_interface")
    if ver < (2, 7):
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                return_softmax):
            """flash-attn 2.6.3: returns (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)."""
            out, lse = _fa_forward(ver, q, k, v, dropout_p, softmax_scale, causal, (window_size[0], window_size[1]),
                                   softcap, alibi_slopes, return_softmax)
            return out, q, k, v, out, lse, None, _rng_state()

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
            """flash-attn 2.6.3: fills dq, dk, dv and returns (dq, dk, dv, softmax_d)."""
            softmax_d = _fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                     (window_size[0], window_size[1]), softcap, alibi_slopes)
            return dq, dk, dv, softmax_d
    else:
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):
            """flash-attn 2.7.4: (out_padded, softmax_lse, S_dmask, rng_state); 2.8.3: (out, ...). The head dim
            is a multiple of 8 here, so both are the output."""
            out, lse = _fa_forward(ver, q, k, v, dropout_p, softmax_scale, causal,
                                   (window_size_left, window_size_right), softcap, alibi_slopes, return_softmax)
            return out, lse, torch.empty(0, dtype=q.dtype), _rng_state()

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            """flash-attn 2.7.4 / 2.8.3: fills dq, dk, dv and returns softmax_d."""
            return _fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                (window_size_left, window_size_right), softcap, alibi_slopes)
    module._flash_attn_forward = _flash_attn_forward
    module._flash_attn_backward = _flash_attn_backward
    return module


def flash_attn_package(version: str) -> types.ModuleType:
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # importlib.util.find_spec reads it
    package.flash_attn_interface = _flash_attn_interface(version)
    return package


# -- torch's CUDA flash op --------------------------------------------------------------------------------

def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention (CUDA): [B, H, S, D] in; (output, logsumexp, cum_seq_q,
    cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask) out, the cum_seq undefined (None)."""
    _unmodelled(dropout_p)
    _check(key.shape[2] == value.shape[2], "Key and Value must have the same sequence length")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    _check_inputs(q, k, v, pass_name="forward", head_dim_multiple=8)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _forward(q, k, v, is_causal, scale)
    empty = torch.empty(0, dtype=query.dtype)
    return out.transpose(1, 2), lse, None, None, q.shape[1], k.shape[1], _rng_state(), torch.empty(0), empty


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward (CUDA) -> (grad_query, grad_key, grad_value)."""
    _unmodelled(dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if cum_seq_q is not None:  # attention_backward.cu: defined -> mha_varlen_bwd, which wants [total, H, D]
        _check(q.dim() == 3, "q must have shape (total_q, num_heads, head_size_og) (a defined cum_seq_q selects "
                             "the varlen backward)")
    dout, o = grad_out.transpose(1, 2).contiguous(), out.transpose(1, 2).contiguous()  # torch copies both
    b, sq, _, h, _, _ = _check_inputs(q, k, v, pass_name="backward", head_dim_multiple=8)
    _check(o.dtype == q.dtype and dout.dtype == q.dtype, "query, out and dout must have the same dtype")
    _check_lse(logsumexp, b, h, sq)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv, _ = _backward(dout, q, k, v, o, logsumexp, is_causal, scale)
    return tuple(g.to(query.dtype).transpose(1, 2) for g in (dq, dk, dv))


# -- installation -----------------------------------------------------------------------------------------

def install(fake: str, patch: pytest.MonkeyPatch) -> str:
    """Put `fake` (one of FAKES) in place of the real API and let its kernel take CPU tensors; returns the
    kernel name (`parallel.sp.kernel`) that reaches it. `patch.undo()` removes it."""
    if fake == "torch_cuda_flash":
        patch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", sdpa_flash_forward)
        patch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_backward", sdpa_flash_backward)
        name = "torch_cuda_flash"
    else:
        version = fake.removeprefix("flash_attn-")
        assert version in FLASH_ATTN_VERSIONS, fake
        package = flash_attn_package(version)
        patch.setitem(sys.modules, "flash_attn", package)
        patch.setitem(sys.modules, "flash_attn.flash_attn_interface", package.flash_attn_interface)
        name = "flash_attn"
    patch.setitem(kernels.KERNELS, name, dataclasses.replace(kernels.KERNELS[name], device_types=("cuda", "cpu")))
    clear_kernel_caches()
    return name


def clear_kernel_caches() -> None:
    """Forget resolved kernels and the imported flash-attn (between installs and after `undo`)."""
    kernels.get_kernel.cache_clear()
    kernels._flash_attn.cache_clear()
