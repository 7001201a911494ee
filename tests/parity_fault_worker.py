"""A rank of `longtune parity` with a deliberately broken attention kernel, to show that the verdict fails.
Run under torchrun (the tests start it): `torchrun --nproc_per_node N tests/parity_fault_worker.py RECIPE ...`.

LONGTUNE_TEST_BROKEN_KERNEL picks the fault, applied to every registered block kernel:
- `causal`: the diagonal blocks see their future keys (a mask bug: off by O(1));
- `scale=R`: the softmax scale is off by the relative amount R in forward and backward (a subtle bug).
Test-only: the fault lives here, never in longtune.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from longtune.parallel import kernels
from longtune.train.commands import parity


def broken(kernel: kernels.BlockKernel, fault: str) -> kernels.BlockKernel:
    if fault == "causal":
        return dataclasses.replace(
            kernel, forward=lambda q, k, v, causal, scale: kernel.forward(q, k, v, False, scale),
            backward=lambda dout, q, k, v, out, lse, causal, scale: kernel.backward(dout, q, k, v, out, lse, False,
                                                                                    scale))
    name, _, value = fault.partition("=")
    assert name == "scale", f"unknown LONGTUNE_TEST_BROKEN_KERNEL {fault!r}"
    factor = 1.0 + float(value)
    return dataclasses.replace(
        kernel, forward=lambda q, k, v, causal, scale: kernel.forward(q, k, v, causal, scale * factor),
        backward=lambda dout, q, k, v, out, lse, causal, scale: kernel.backward(dout, q, k, v, out, lse, causal,
                                                                                scale * factor))


if __name__ == "__main__":
    fault = os.environ["LONGTUNE_TEST_BROKEN_KERNEL"]
    for name, kernel in list(kernels.KERNELS.items()):
        kernels.KERNELS[name] = broken(kernel, fault)
    kernels.get_kernel.cache_clear()
    sys.exit(parity.main(sys.argv[1:]))
