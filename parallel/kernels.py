"""Block attention kernels behind one contract, chosen from a registry.

Forward  `(q, k, v, causal, scale) -> (out, lse)`;
backward `(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`.

Layout `[B, H, S, D]`; k/v may have fewer heads than q (GQA, Hq a multiple of Hkv) and dk/dv
come back in the k/v head count. `lse` is `[B, H, Sq]`, fp32, natural log; callers may pass views
(a slice of the rows of a multi-head LSE is not contiguous): a kernel whose API reads raw memory
makes its own copy. `causal` is top-left aligned and only used for square diagonal blocks (query i
sees keys 0..i), where flash-attn's bottom-right alignment is the same. The backward takes the
*final* `out` and `lse` of the whole attention, which is what makes block-wise backward exact.

Providers: torch's CPU flash op (CPU), plain torch math (any device and dtype: the float32 kernel on
GPU), torch's CUDA flash op and flash-attn 2.6-2.8's private entry points (CUDA, bf16/fp16). The CUDA
providers are exercised on CPU through contract fakes of their APIs (tests/kernel_fakes.py).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("longtune")

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockKernel:
    name: str
    forward: ForwardFn
    backward: BackwardFn
    device_types: tuple[str, ...]  # () : any device
    dtypes: tuple[torch.dtype, ...]
    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    package: str | None = None  # an optional dependency it needs (import name)


KERNELS: dict[str, BlockKernel] = {}


def register_kernel(kernel: BlockKernel) -> BlockKernel:
    KERNELS[kernel.name] = kernel
    return kernel


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] == q.shape[1] else t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _fold_kv_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    if grad.shape[1] == kv_heads:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


# -- torch CPU flash op ---------------------------------------------------------------------------

def _cpu_flash_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


register_kernel(BlockKernel("torch_cpu", _cpu_flash_forward, _cpu_flash_backward, ("cpu",),
                            (torch.float32, torch.float64, *HALF_DTYPES)))


# -- plain torch math -----------------------------------------------------------------------------

_SCORE_ELEMENTS = 1 << 25
"""Scores held at once by the math kernel (128 MiB in fp32): it walks the query rows in chunks of that size."""


def _row_chunks(q: torch.Tensor, k: torch.Tensor) -> list[slice]:
    b, h, sq, _ = q.shape
    step = max(1, _SCORE_ELEMENTS // (b * h * k.shape[2]))
    return [slice(i, min(i + step, sq)) for i in range(0, sq, step)]


def _scores(q_rows: torch.Tensor, k: torch.Tensor, rows: slice, causal: bool, scale: float) -> torch.Tensor:
    s = (q_rows @ k.transpose(-1, -2)) * scale
    if causal:  # top-left: query i sees keys 0..i
        i = torch.arange(rows.start, rows.stop, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(k.shape[2], device=s.device)[None, :] > i, float("-inf"))
    return s


def _math_forward(q, k, v, causal, scale):
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the fp32 matmuls in bf16
        return _math_forward_fp32(q, k, v, causal, scale)


def _math_forward_fp32(q, k, v, causal, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    ke, ve = _expand_kv(q, k).to(compute), _expand_kv(q, v).to(compute)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for rows in _row_chunks(q, k):
        s = _scores(q[:, :, rows].to(compute), ke, rows, causal, scale)
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, rows] = (torch.exp(s - row_lse[..., None]) @ ve).to(q.dtype)
        lse[:, :, rows] = row_lse
    return out, lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    with torch.autocast(q.device.type, enabled=False):
        return _math_backward_fp32(dout, q, k, v, out, lse, causal, scale)


def _math_backward_fp32(dout, q, k, v, out, lse, causal, scale):
    """Recomputes the probabilities from the final `lse`; `D = rowsum(dout · out)` as flash attention does."""
    compute = torch.promote_types(q.dtype, torch.float32)
    ke, ve = _expand_kv(q, k).to(compute), _expand_kv(q, v).to(compute)
    dq = torch.empty(q.shape, dtype=compute, device=q.device)
    dk, dv = torch.zeros_like(ke), torch.zeros_like(ve)
    delta = (dout.to(compute) * out.to(compute)).sum(dim=-1)
    for rows in _row_chunks(q, k):
        q_rows, dout_rows = q[:, :, rows].to(compute), dout[:, :, rows].to(compute)
        p = torch.exp(_scores(q_rows, ke, rows, causal, scale) - lse[:, :, rows, None].to(compute))
        dv += p.transpose(-1, -2) @ dout_rows
        ds = p * (dout_rows @ ve.transpose(-1, -2) - delta[:, :, rows, None])
        dq[:, :, rows] = (ds @ ke) * scale
        dk += (ds.transpose(-1, -2) @ q_rows) * scale
    return dq.to(q.dtype), _fold_kv_grad(dk, k.shape[1]).to(k.dtype), _fold_kv_grad(dv, v.shape[1]).to(v.dtype)


register_kernel(BlockKernel("torch_math", _math_forward, _math_backward, (),
                            (torch.float32, torch.float64, *HALF_DTYPES)))


# -- torch CUDA flash op ----------------------------------------------------------------------------

def _cuda_flash_forward(q, k, v, causal, scale):
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    sq, sk = q.shape[2], k.shape[2]
    unused = torch.empty(0, device=q.device)
    # cum_seq_q/k None (undefined, as the dense forward returns them): a defined tensor selects torch's varlen
    # backward. The LSE is read by raw pointer as a dense [B, H, Sq] array.
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse.contiguous(), None, None, sq, sk, 0.0, causal, unused, unused, scale=scale)
    return dq, _fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])


register_kernel(BlockKernel("torch_cuda_flash", _cuda_flash_forward, _cuda_flash_backward, ("cuda",), HALF_DTYPES,
                            head_dim_multiple=8, max_head_dim=256))


# -- flash-attn (optional) --------------------------------------------------------------------------

@functools.cache
def _flash_attn() -> tuple[object, bool]:
    """(flash_attn.flash_attn_interface, whether it takes the 2.6 `window_size` tuple).

    2.6 takes `window_size=(left, right)` and its forward returns 8 values (lse 6th); 2.7 and 2.8 take
    `window_size_left`, `window_size_right` and return 4 (lse 2nd). Chosen by the package's version.
    """
    try:
        import flash_attn  # noqa: PLC0415
        from flash_attn import flash_attn_interface  # noqa: PLC0415
    except (ImportError, OSError) as exc:  # OSError: a wheel built against another CUDA / torch
        raise RuntimeError(f"flash-attn is installed but does not import: {exc}") from exc
    major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    return flash_attn_interface, (major, minor) < (2, 7)


def _flash_attn_forward(q, k, v, causal, scale):
    fa, window_tuple = _flash_attn()
    # flash-attn wants [B, S, H, D] (last dim contiguous, which these views keep) and returns lse as [B, H, S].
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale)
    common = {"causal": causal, "softcap": 0.0, "alibi_slopes": None, "return_softmax": False}
    if window_tuple:
        res = fa._flash_attn_forward(*args, window_size=(-1, -1), **common)
        out, lse = res[0], res[5]
    else:
        res = fa._flash_attn_forward(*args, window_size_left=-1, window_size_right=-1, **common)
        out, lse = res[0], res[1]
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    fa, window_tuple = _flash_attn()
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    dq, dk, dv = torch.empty_like(t(q)), torch.empty_like(t(k)), torch.empty_like(t(v))
    window = ((-1, -1),) if window_tuple else (-1, -1)
    # Fills dq, dk, dv in place. The LSE is read by raw pointer as a dense [B, H, Sq] array, unchecked.
    fa._flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
                            *window, 0.0, None, False)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


register_kernel(BlockKernel("flash_attn", _flash_attn_forward, _flash_attn_backward, ("cuda",), HALF_DTYPES,
                            head_dim_multiple=8, max_head_dim=256, package="flash_attn"))

_PREFERENCE = ("flash_attn", "torch_cuda_flash", "torch_cpu", "torch_math")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_problem(kernel: str | None, device_type: str, dtype: torch.dtype | str,
                   head_dim: int | None = None) -> str | None:
    """Why block kernel `kernel` cannot run attention of `dtype` and `head_dim` on `device_type`, or None.

    None (the recipe's null) always has a kernel: torch_math runs anything. Checks that the package is
    installed without importing it, so the launcher can ask before any worker starts.
    """
    if kernel is None:
        return None
    if kernel not in KERNELS:
        return f"unknown attention kernel {kernel!r}; valid: {', '.join(sorted(KERNELS))}"
    spec = KERNELS[kernel]
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where = f"parallel.sp.kernel {kernel}"
    if spec.package is not None and importlib.util.find_spec(spec.package) is None:
        return (f"{where}: the {spec.package} package is not installed (pip install 'longtune[gpu]'), or set "
                "parallel.sp.kernel=null for the best installed kernel")
    if spec.device_types and device_type not in spec.device_types:
        return (f"{where} is not available on {device_type} (it runs on {', '.join(spec.device_types)}); "
                "parallel.sp.kernel=null picks one that is")
    if dtype not in spec.dtypes:
        return (f"{where} takes {' or '.join(map(_dtype_name, spec.dtypes))}, not {_dtype_name(dtype)} (model.dtype; "
                "`longtune parity` and `longtune eval --sp` run float32): set parallel.sp.kernel=null, which picks "
                "torch_math for float32 on GPU")
    if head_dim is not None and (head_dim % spec.head_dim_multiple
                                 or (spec.max_head_dim is not None and head_dim > spec.max_head_dim)):
        return (f"{where} needs a head dim that is a multiple of {spec.head_dim_multiple} and at most "
                f"{spec.max_head_dim}; the model's is {head_dim} (parallel.sp.kernel=null picks one that fits)")
    return None


@functools.cache
def get_kernel(name: str | None, device: torch.device | str, dtype: torch.dtype = torch.float32,
               head_dim: int | None = None) -> BlockKernel:
    """The named kernel, or the first of flash_attn, torch_cuda_flash, torch_cpu, torch_math that can run
    `dtype` / `head_dim` on `device` when `name` is None. Cached: the choice (and its log line) happens once
    per process, not on every attention call."""
    device_type = torch.device(device).type
    if name is not None:
        problem = kernel_problem(name, device_type, dtype, head_dim)
        if problem:
            raise ValueError(problem)
        return KERNELS[name]
    for candidate in _PREFERENCE:
        if kernel_problem(candidate, device_type, dtype, head_dim) is None:
            if candidate == "torch_math" and device_type != "cpu":
                log.info("attention kernel: torch_math for %s on %s (head dim %s); the flash kernels take %s "
                         "with a head dim that is a multiple of 8 up to 256", _dtype_name(dtype), device_type,
                         head_dim, " or ".join(map(_dtype_name, HALF_DTYPES)))
            return KERNELS[candidate]
    raise ValueError(f"no attention kernel takes {_dtype_name(dtype)} on {device_type}")
