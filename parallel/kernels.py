"""Block attention kernels behind one contract, chosen from a registry.

Forward  `(q, k, v, causal, scale) -> (out, lse)`;
backward `(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`.

Layout `[B, H, S, D]`; k/v may have fewer heads than q (GQA, Hq a multiple of Hkv) and dk/dv
come back in the k/v head count. `lse` is `[B, H, Sq]`, fp32, natural log. `causal` is top-left
aligned and only used for square diagonal blocks (query i sees keys 0..i). The backward takes the
*final* `out` and `lse` of the whole attention, which is what makes block-wise backward exact.

Providers: torch's CPU flash op (the tested path), torch's CUDA flash op, and flash-attn when
installed (optional; its import is guarded against the broken CPU shell). The CUDA providers are
written against the same contract but cannot be exercised on a CPU-only machine; their tests skip
without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockKernel:
    name: str
    forward: ForwardFn
    backward: BackwardFn
    available: Callable[[torch.device], bool]


_KERNELS: dict[str, BlockKernel] = {}


def register_kernel(kernel: BlockKernel) -> BlockKernel:
    _KERNELS[kernel.name] = kernel
    return kernel


# -- torch CPU flash op ---------------------------------------------------------------------------

def _cpu_flash_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


register_kernel(BlockKernel("torch_cpu", _cpu_flash_forward, _cpu_flash_backward,
                            lambda device: device.type == "cpu"))


# -- torch CUDA ops ---------------------------------------------------------------------------------

def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] == q.shape[1] else t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _fold_kv_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    if grad.shape[1] == kv_heads:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


def _cuda_flash_forward(q, k, v, causal, scale):
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    sq, sk = q.shape[2], k.shape[2]
    cum_q = torch.zeros(0, dtype=torch.int32, device=q.device)
    empty = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse, cum_q, cum_q, sq, sk, 0.0, causal, empty, empty, scale=scale)
    return dq, _fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])


register_kernel(BlockKernel("torch_cuda_flash", _cuda_flash_forward, _cuda_flash_backward,
                            lambda device: device.type == "cuda"))


# -- flash-attn (optional) --------------------------------------------------------------------------

def _flash_attn_module():
    try:
        from flash_attn import flash_attn_interface  # noqa: PLC0415
    except (ImportError, ModuleNotFoundError, OSError):
        return None
    return flash_attn_interface


def _flash_attn_forward(q, k, v, causal, scale):
    fa = _flash_attn_module()
    # flash-attn wants [B, S, H, D] and returns lse as [B, H, S].
    res = fa._flash_attn_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale,
                                 causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                                 alibi_slopes=None, return_softmax=False)
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    fa = _flash_attn_module()
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    dq, dk, dv = torch.empty_like(t(q)), torch.empty_like(t(k)), torch.empty_like(t(v))
    fa._flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse, dq, dk, dv, 0.0, scale, causal,
                            -1, -1, 0.0, None, False)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


register_kernel(BlockKernel("flash_attn", _flash_attn_forward, _flash_attn_backward,
                            lambda device: device.type == "cuda" and _flash_attn_module() is not None))

_PREFERENCE = ("flash_attn", "torch_cuda_flash", "torch_cpu")


def get_kernel(name: str | None, device: torch.device) -> BlockKernel:
    """The named kernel, or the best available one for `device` when `name` is None."""
    if name is not None:
        if name not in _KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; valid: {', '.join(sorted(_KERNELS))}")
        kernel = _KERNELS[name]
        if not kernel.available(device):
            raise ValueError(f"attention kernel {name!r} is not available on {device.type}")
        return kernel
    for candidate in _PREFERENCE:
        if _KERNELS[candidate].available(device):
            return _KERNELS[candidate]
    raise ValueError(f"no attention kernel is available on {device.type}")
