"""Recomputation, activation and checkpoint offload, tiled loss and MLP: the loss curve is unchanged
(tiled pieces in isolation: test_tiled.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import CURVE_ARGS, assert_close_curves, longtune, losses
from longtune.parallel.layout import Layout
from longtune.parallel.recompute import activation_offload, apply_recompute
from longtune.train.model import build_config, build_model, resolve_model_source

ARGS = CURVE_ARGS

def recompute(mode: str, every: int = 1, modules: tuple[str, ...] = (), offload_checkpoints: bool = False,
              offload_dir: str | None = None) -> Layout:
    """A layout with only recomputation (and checkpoint offload) switched on."""
    return Layout(recompute=mode, recompute_every=every, recompute_modules=modules,
                  offload_checkpoints=offload_checkpoints, offload_tier="disk" if offload_dir else "host",
                  offload_dir=offload_dir)



def _tiny(layers: int = 4):
    source = resolve_model_source("tiny-llama")
    config = build_config(source, 300, {"num_hidden_layers": layers})
    return build_model(source, config, device="cpu", attn_implementation="sdpa", seed=0)


def _calls(model, settings: Layout, module: str = "mlp") -> list[int]:
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        # A pre-hook: non-reentrant recomputation stops early once it has what backward needs, which
        # can be before a module's forward returns.
        getattr(layer, module).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    apply_recompute(model.model.layers, settings)
    ids = torch.randint(3, 300, (1, 32))
    model(input_ids=ids).logits.sum().backward()
    return calls


@pytest.mark.parametrize("settings,expected", [
    (recompute("none"), [1, 1, 1, 1]),
    (recompute("full"), [2, 2, 2, 2]),
    (recompute("selective", every=2), [2, 1, 2, 1]),
    (recompute("selective", modules=("mlp",)), [2, 2, 2, 2]),
    (recompute("selective", modules=("self_attn",)), [1, 1, 1, 1]),
    # Nested, the MLP last in the layer: the layer's recomputation stops once it has the MLP's input (all
    # that the layer's own checkpoint saved), the MLP's checkpoint recomputes it once.
    (recompute("full", modules=("mlp",)), [2, 2, 2, 2]),
])
def test_recompute_runs_the_chosen_modules_again_in_backward(settings, expected):
    assert _calls(_tiny(), settings) == expected


def test_nested_recompute_runs_an_inner_module_once_more():
    # The attention inside the layer: forward, the layer's recomputation (which must get past it), and
    # its own recomputation during its backward; the layer's recomputation keeps only its input.
    settings = recompute("full", modules=("self_attn",))
    assert _calls(_tiny(), settings, "self_attn") == [3, 3, 3, 3]
    assert _calls(_tiny(), recompute("full"), "self_attn") == [2, 2, 2, 2]


def test_recompute_and_offload_give_identical_gradients():
    ids = torch.randint(3, 300, (2, 48))

    def grads(settings, offload):
        model = _tiny()
        apply_recompute(model.model.layers, settings)
        with activation_offload(offload):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}

    base = grads(recompute("none"), False)
    nested = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    for settings, offload in ((recompute("full"), False), (recompute("none"), True),
                              (recompute("selective", modules=("mlp",)), True),
                              (recompute("full", modules=nested, offload_checkpoints=True), False)):
        got = grads(settings, offload)
        assert got.keys() == base.keys()
        for name in base:
            torch.testing.assert_close(got[name], base[name], rtol=0, atol=1e-7, msg=name)


def test_unknown_submodule_is_refused():
    with pytest.raises(ValueError, match="no sub-module 'ffn'"):
        apply_recompute(_tiny().model.layers, recompute("selective", modules=("ffn",)))


LAYOUTS = {
    "full": ["memory.recompute=full"],
    "selective-mlp+activation-offload": ["memory.recompute=selective", "memory.recompute_modules=[mlp]",
                                         "memory.offload.activations=true"],
    "fsdp2-full": ["memory.recompute=full", "parallel.dp=2", "parallel.fsdp=true"],
    "zero3-selective": ["memory.recompute=selective", "memory.recompute_every=2", "parallel.dp=2",
                        "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=3"],
    # Chunks that do not divide the 256-token rows (128 per sequence-parallel shard).
    "tiled-loss": ["memory.tiled_loss=true", "memory.tiled_loss_chunk=100"],
    "tiled-mlp": ["memory.tiled_mlp=true", "memory.tiled_mlp_chunk=100"],
    "full+checkpoint-offload": ["memory.recompute=full", "memory.offload.checkpoints=true"],
    # Checkpoints, gradients and AdamW's state in files between uses (removed at exit: asserted below), norms
    # nested; two micro-batches, so that offloaded gradients are accumulated through the tier.
    "full-nested-norms+disk-offload+gradients+optimizer-swap": [
        "memory.recompute=full", "memory.recompute_modules=[input_layernorm,post_attention_layernorm]",
        "memory.offload.checkpoints=true", "memory.offload.optimizer_swap=true", "memory.offload.gradients=true",
        "memory.offload.tier=disk"],
    # DDP (over the ring) with the tiled MLP's own autograd function.
    "tiled-loss+tiled-mlp+sp-ring2": ["memory.tiled_loss=true", "memory.tiled_loss_chunk=50", "memory.tiled_mlp=true",
                                      "memory.tiled_mlp_chunk=50", "parallel.sp.ring=2"],
    "fsdp2-tiled+selective-mlp+checkpoint-offload": [
        "memory.tiled_loss=true", "memory.tiled_loss_chunk=100", "memory.tiled_mlp=true",
        "memory.tiled_mlp_chunk=100", "memory.recompute=selective", "memory.recompute_modules=[mlp]",
        "memory.offload.checkpoints=true", "parallel.dp=2", "parallel.fsdp=true"],
}


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k == "zero3-selective" else k
                                    for k in LAYOUTS])  # slow: CI time; ZeRO-3 parity is in test_parallel_backends
def test_three_step_curve_is_unchanged(layout, curve_reference, tmp_path):
    longtune("train", *ARGS, *LAYOUTS[layout], f"train.output_dir={tmp_path}")
    assert_close_curves(losses(tmp_path), losses(curve_reference), rel=1e-5)
    assert not (tmp_path / "offload").exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_three_step_curve_is_unchanged_with_tiling_and_checkpoint_offload_under_zero3(curve_reference, tmp_path):
    # ZeRO-3 gathers lm_head / MLP weights once per chunk, in forward and again in the recomputation.
    longtune("train", *ARGS, "memory.tiled_loss=true", "memory.tiled_loss_chunk=100", "memory.tiled_mlp=true",
             "memory.tiled_mlp_chunk=100", "memory.recompute=full", "memory.offload.checkpoints=true",
             "parallel.dp=2", "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=3",
             f"train.output_dir={tmp_path}")
    assert_close_curves(losses(tmp_path), losses(curve_reference), rel=1e-5)
