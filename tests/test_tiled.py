"""Tiled loss, tiled MLP and checkpoint offload in isolation: the same loss and gradients as the plain
model (fp32), the full logits / MLP intermediates never alive at once, checkpointed inputs really
moved off the device tensor, state-dict keys unchanged. The training curves are in test_memory.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longtune.parallel.layout import Layout
from longtune.parallel.recompute import apply_recompute
from longtune.parallel.tiling import (
    DeferredNorm,
    TiledLMHead,
    TiledMLP,
    apply_tiled_loss,
    apply_tiled_mlp,
    install_loss_head,
    lm_head_computes_loss,
)
from longtune.train.data import IGNORE_INDEX
from longtune.train.loss import token_loss_sum
from longtune.train.model import build_config, build_model, resolve_model_source
from longtune.train.recipe import RecipeError, recipe_from_dict

VOCAB, HIDDEN, INTERMEDIATE = 300, 128, 352  # tiny-llama with a 300-token vocabulary
REL = 1e-6

def recompute(mode: str, every: int = 1, modules: tuple[str, ...] = (), offload_checkpoints: bool = False,
              offload_dir: str | None = None) -> Layout:
    """A layout with only recomputation (and checkpoint offload) switched on."""
    return Layout(recompute=mode, recompute_every=every, recompute_modules=modules,
                  offload_checkpoints=offload_checkpoints, offload_tier="disk" if offload_dir else "host",
                  offload_dir=offload_dir)



def _tiny(layers: int = 2):
    source = resolve_model_source("tiny-llama")
    config = build_config(source, VOCAB, {"num_hidden_layers": layers})
    return build_model(source, config, device="cpu", attn_implementation="sdpa", seed=0)


def _batch(rows: int = 2, length: int = 37):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    labels = torch.randint(3, VOCAB, (rows, length), generator=gen)
    labels[0, 3:9] = IGNORE_INDEX  # ignored positions inside a chunk
    labels[:, 10:15] = IGNORE_INDEX  # with chunk 5: a chunk whose every label is ignored
    labels[1, -1] = IGNORE_INDEX
    return ids, labels


def _loss_and_grads(model, ids, labels, tiled: bool):
    with lm_head_computes_loss(labels if tiled else None, token_loss_sum):
        out = model(input_ids=ids).logits
    loss = out if tiled else token_loss_sum(out, labels)
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_same(got, want, rel=REL):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) <= rel * abs(ref_loss), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max() / g.abs().max()
        assert err <= rel, f"{name}: max|g - g_ref| / max|g_ref| = {err:.2e}"


@pytest.mark.parametrize("chunk", [5, 16, 37, 64])  # 5 and 16 do not divide 37; 64 > length
def test_tiled_loss_equals_untiled(chunk):
    ids, labels = _batch()
    ref = _loss_and_grads(_tiny(), ids, labels, tiled=False)
    model = _tiny()
    assert apply_tiled_loss(model, chunk)
    _assert_same(_loss_and_grads(model, ids, labels, tiled=True), ref)


def test_loss_head_in_one_piece_equals_untiled():
    # chunk None: the head tensor parallelism installs (there on vocabulary-sharded logits)
    ids, labels = _batch()
    ref = _loss_and_grads(_tiny(), ids, labels, tiled=False)
    model = _tiny()
    assert install_loss_head(model, None, "test").chunk is None
    _assert_same(_loss_and_grads(model, ids, labels, tiled=True), ref)
    assert apply_tiled_loss(model, 5) and model.lm_head.chunk == 5  # tiled loss then chunks that head
    model.zero_grad(set_to_none=True)
    _assert_same(_loss_and_grads(model, ids, labels, tiled=True), ref)


def test_tiled_loss_runs_the_final_norm_in_its_chunks():
    # The norm's input is all the forward keeps of it; each chunk applies the norm inside its checkpoint.
    ids, labels = _batch()
    model = _tiny()
    apply_tiled_loss(model, 5)
    assert isinstance(model.model.norm, DeferredNorm)
    calls: list[int] = []
    model.model.norm._checkpoint_wrapped_module.register_forward_hook(lambda _m, a, _o: calls.append(a[0].shape[1]))
    _loss_and_grads(model, ids, labels, tiled=True)
    # 37 positions in chunks of 5: forward, then each chunk's recomputation in backward (last chunk first)
    assert calls[:8] == [5] * 7 + [2] and sorted(calls[8:]) == [2] + [5] * 7


def test_tiled_lm_head_gives_logits_outside_the_loss_context():
    ids, _ = _batch()
    model = _tiny()
    apply_tiled_loss(model, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _tiny()(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [7, 37, 50])
def test_tiled_mlp_equals_untiled(chunk):
    ids, labels = _batch()
    ref = _loss_and_grads(_tiny(), ids, labels, tiled=False)
    model = _tiny()
    assert apply_tiled_mlp(model.model.layers, chunk) == 2
    assert all(isinstance(layer.mlp, TiledMLP) for layer in model.model.layers)
    _assert_same(_loss_and_grads(model, ids, labels, tiled=False), ref)


def test_tiled_mlp_module_output_and_gradients():
    mlp = _tiny().model.layers[0].mlp
    x = torch.randn(3, 29, HIDDEN, requires_grad=True)
    out = mlp(x)
    (out * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    ref = (out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    mlp.zero_grad()
    x.grad = None
    tiled = TiledMLP(mlp, 4)
    out = tiled(x)
    (out * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    assert (out - ref[0]).abs().max() <= REL * ref[0].abs().max()
    assert (x.grad - ref[1]).abs().max() <= REL * ref[1].abs().max()
    for name, p in mlp.named_parameters():
        assert (p.grad - ref[2][name]).abs().max() <= REL * ref[2][name].abs().max(), name


def test_everything_together_equals_the_plain_model():
    ids, labels = _batch()
    ref = _loss_and_grads(_tiny(), ids, labels, tiled=False)
    for settings in (recompute("full", offload_checkpoints=True),
                     recompute("selective", modules=("mlp",), offload_checkpoints=True)):
        model = _tiny()
        apply_tiled_mlp(model.model.layers, 6)
        apply_tiled_loss(model, 10)
        apply_recompute(model.model.layers, settings)
        _assert_same(_loss_and_grads(model, ids, labels, tiled=True), ref)


class LiveTensors(TorchDispatchMode):
    """Every op's outputs whose last dimension is `last_dim`: the largest one, and the peak of the bytes
    of such storages alive at once (weak references, so tensors freed by autograd count as freed).
    Tensors of HIDDEN rows are weights (lm_head / down_proj, their transposes and gradients): skipped;
    the tests use sizes where no activation has HIDDEN rows."""

    def __init__(self, last_dim: int, ndim: int | None = None, skip: tuple[torch.Tensor, ...] = ()) -> None:
        """`ndim`: count only tensors of that many dimensions; `skip`: tensors made before (and their views)."""
        super().__init__()
        self.last_dim, self.ndim, self.largest, self.peak = last_dim, ndim, 0, 0
        self.skip = {t.untyped_storage()._cdata for t in skip}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.last_dim
                    and t.numel() != HIDDEN * self.last_dim and self.ndim in (None, t.dim())
                    and t.untyped_storage()._cdata not in self.skip):
                storage = t.untyped_storage()
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.largest = max(self.largest, t.numel())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _traced(model, ids, labels, tiled: bool, last_dim: int) -> LiveTensors:
    with LiveTensors(last_dim) as trace:
        _loss_and_grads(model, ids, labels, tiled)
    return trace


def test_tiled_loss_never_holds_the_full_logits():
    rows, length, chunk = 2, 48, 8  # 96 rows of activations, never HIDDEN
    ids, labels = _batch(rows, length)
    full = rows * length * VOCAB
    plain = _traced(_tiny(), ids, labels, tiled=False, last_dim=VOCAB)
    assert plain.largest >= full  # the probe sees the full logits when they exist
    model = _tiny()
    apply_tiled_loss(model, chunk)
    tiled = _traced(model, ids, labels, tiled=True, last_dim=VOCAB)
    per_chunk = rows * chunk * VOCAB
    assert tiled.largest <= per_chunk, (tiled.largest, per_chunk)
    # Forward and backward together: a few chunk-sized tensors (logits, fp32 log-softmax, its gradient)
    # at once, never more than one chunk's worth of each.
    assert tiled.peak <= 4 * per_chunk * 4, (tiled.peak, per_chunk * 4)
    assert tiled.peak < plain.peak / 4, (tiled.peak, plain.peak)


def test_tiled_mlp_holds_one_chunk_of_intermediates():
    rows, length, chunk = 2, 48, 8  # 96 rows of activations, never HIDDEN
    ids, labels = _batch(rows, length)
    plain = _traced(_tiny(1), ids, labels, tiled=False, last_dim=INTERMEDIATE)
    assert plain.largest >= rows * length * INTERMEDIATE
    model = _tiny(1)
    apply_tiled_mlp(model.model.layers, chunk)
    tiled = _traced(model, ids, labels, tiled=False, last_dim=INTERMEDIATE)
    per_chunk = rows * chunk * INTERMEDIATE
    assert tiled.largest <= per_chunk
    assert tiled.peak <= 8 * per_chunk * 4, (tiled.peak, per_chunk * 4)
    assert tiled.peak < plain.peak / 4, (tiled.peak, plain.peak)


def test_tiled_mlp_writes_the_input_gradient_in_place():
    # Backward of the MLP alone: the input gradient is one [B, L, H] tensor filled chunk by chunk. Chunks as
    # separate autograd inputs would hold every chunk's gradient and then their concatenation (two of them).
    rows, length, chunk = 2, 48, 8
    mlp = _tiny(1).model.layers[0].mlp
    x = torch.randn(rows, length, HIDDEN, requires_grad=True)
    grad_out = torch.randn(rows, length, HIDDEN)
    out = TiledMLP(mlp, chunk)(x)
    with LiveTensors(HIDDEN, ndim=3, skip=(x, grad_out, out)) as trace:
        out.backward(grad_out)
    full, per_chunk = rows * length * HIDDEN * 4, rows * chunk * HIDDEN * 4
    # Besides it, one chunk at a time: its recomputed output and the two partial input gradients (through
    # gate_proj and up_proj) with their sum. The concatenation of 6 chunks' gradients would be 2 × full.
    assert full <= trace.peak <= full + 4 * per_chunk < 2 * full, (trace.peak, full)
    reference = x.detach().requires_grad_()
    mlp(reference).backward(grad_out)
    assert (x.grad - reference.grad).abs().max() <= REL * reference.grad.abs().max()


@pytest.mark.parametrize("settings", [recompute("full"), recompute("selective", every=1),
                                      recompute("selective", modules=("mlp",))])
def test_checkpoint_offload_moves_the_checkpointed_inputs(settings, monkeypatch):
    """With offload the device tensor a checkpoint keeps for recomputation is released after forward
    (a host copy is kept instead); without it, it stays alive until backward. Gradients are identical.
    Synchronous tiers: a write behind holds its tensor until written, which may be after forward."""
    monkeypatch.setenv("LONGTUNE_OFFLOAD_OVERLAP", "0")
    ids, labels = _batch()

    def run(offload: bool):
        model = _tiny()
        apply_recompute(model.model.layers, replace(settings, offload_checkpoints=offload))
        inputs = []
        for layer in model.model.layers:
            wrapped = layer.mlp if settings.recompute_modules else layer
            wrapped.register_forward_pre_hook(
                lambda _m, args: inputs.append(StorageWeakRef(args[0].untyped_storage())))
        loss = token_loss_sum(model(input_ids=ids).logits, labels)
        alive = [not ref.expired() for ref in inputs]
        loss.backward()
        return alive, {n: p.grad for n, p in model.named_parameters()}

    kept, ref_grads = run(False)
    released, grads = run(True)
    assert kept == [True, True] and released == [False, False]
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_wrappers_keep_the_state_dict_keys():
    plain = _tiny()
    model = _tiny()
    apply_tiled_mlp(model.model.layers, 8)
    apply_tiled_loss(model, 8)
    apply_recompute(model.model.layers, recompute("full", offload_checkpoints=True))
    assert isinstance(model.lm_head, TiledLMHead)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


def test_recipe_keys():
    recipe = recipe_from_dict({"memory": {"tiled_loss": True, "tiled_mlp": True, "tiled_loss_chunk": 100,
                                          "recompute": "full", "offload": {"checkpoints": True}}})
    assert recipe.memory.tiled_loss_chunk == 100 and recipe.memory.tiled_mlp_chunk == 4096
    with pytest.raises(RecipeError, match="memory.offload.checkpoints .* needs memory.recompute=full or selective"):
        recipe_from_dict({"memory": {"offload": {"checkpoints": True}}})
    with pytest.raises(RecipeError, match="tiled_loss_chunk"):
        recipe_from_dict({"memory": {"tiled_loss_chunk": 0}})
