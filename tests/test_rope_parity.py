"""Every rope-extension method gives the single-process result under every parallel layout.

The sequence-parallel layouts (Ulysses, ring, zigzag, hybrid) × every method are in the parity worker
(test_sequence_parallel.py, logits / loss / gradients within 1e-5). Here `longtune parity` runs the whole
training path (recipe → extension → model build → layout) for the two length-dependent ropes that used
to choose their frequencies per shard, and (slow) every method under tensor parallelism (parity) and
pipeline parallelism (2-step loss curves against one process).

The tiny model's 256-token rows are longer than the original length set here (128), so dynamic NTK
rescales and LongRoPE switches to its long factors in the single-process run, where a rank holding the
first half of the sequence alone would not.
"""

from __future__ import annotations

import pytest

from conftest import assert_close_curves, longtune, losses

pytestmark = pytest.mark.multiproc

METHOD_ARGS = {
    "linear": ["extension.target_length=512"],
    "ntk": ["extension.target_length=512"],
    "dynamic": ["extension.factor=4"],
    "yarn": ["extension.target_length=512"],
    "llama3": ["extension.target_length=512"],
    "longrope": ["extension.target_length=512",
                 "extension.options.long_factor=[" + ",".join(str(1 + 0.5 * i) for i in range(16)) + "]"],
    "abf": ["extension.target_length=512", "extension.rope_theta=500000"],
}


def parity(method: str, *layout: str) -> str:
    proc = longtune("parity", "tiny-smoke", f"extension.method={method}", *METHOD_ARGS[method],
                    "model.config_overrides.max_position_embeddings=128", *layout, "--steps", "1", check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
    return proc.stdout


@pytest.mark.parametrize("method,layout", [("longrope", ["parallel.sp.ring=2", "parallel.sp.ring_impl=ring"]),
                                           pytest.param("dynamic", ["parallel.sp.ulysses=2"],
                                                        marks=pytest.mark.slow)],  # CI time: the worker covers it
                         ids=["longrope-contiguous-ring2", "dynamic-ulysses2"])
def test_length_dependent_rope_under_sequence_parallelism(method, layout):
    parity(method, *layout)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_ARGS)
def test_every_rope_method_under_tensor_parallelism(method):
    parity(method, "parallel.tp=2")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_ARGS)
def test_every_rope_method_under_pipeline_parallelism(method, tmp_path):
    """`longtune parity` compares whole-model gradients, which pipeline stages do not hold: the 2-step loss
    curve of pp 2 against one process instead (as tests/test_pipeline_parallel.py does)."""
    args = ["tiny-smoke", f"extension.method={method}", *METHOD_ARGS[method],
            "model.config_overrides.max_position_embeddings=128", "train.max_steps=2", "train.progress=false",
            "train.export=false"]
    longtune("train", *args, f"train.output_dir={tmp_path / 'one'}")
    longtune("train", *args, "parallel.pp=2", f"train.output_dir={tmp_path / 'pp'}")
    assert_close_curves(losses(tmp_path / "pp"), losses(tmp_path / "one"), rel=1e-5)
