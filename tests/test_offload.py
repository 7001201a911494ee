"""Offload tiers (host memory, disk), optimizer state swapping and gradient offload: tensors come back bit for
bit, the files go away, and a swapped AdamW or offloaded gradients train, checkpoint and resume exactly like the
plain run. The tiers' background I/O: a get right after a put, a handle dropped mid-write, close, a failed write,
the bound on bytes in flight, and overlapped training bit for bit like synchronous."""

from __future__ import annotations

import threading

import pytest
import torch

from longtune.parallel import offload
from longtune.parallel.backend import BackendSettings
from longtune.parallel.dims import ParallelDims
from longtune.parallel.layout import Layout
from longtune.parallel.native_backend import NativeBackend
from longtune.parallel.offload import DiskTier, GradientOffload, HostTier, OptimizerStateSwap, read_all
from longtune.parallel.offload_io import offload_wait_seconds
from longtune.parallel.recompute import apply_recompute
from longtune.train.model import build_config, build_model, resolve_model_source


def recompute(mode: str, every: int = 1, modules: tuple[str, ...] = (), offload_checkpoints: bool = False,
              offload_dir: str | None = None) -> Layout:
    """A layout with only recomputation (and checkpoint offload) switched on."""
    return Layout(recompute=mode, recompute_every=every, recompute_modules=modules,
                  offload_checkpoints=offload_checkpoints, offload_tier="disk" if offload_dir else "host",
                  offload_dir=offload_dir)


SETTINGS = BackendSettings(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                           lr_multiplier=lambda step: 1.0)



@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_tier_gives_back_the_same_tensor(tier, dtype, overlap, tmp_path):
    store = HostTier(overlap=overlap) if tier == "host" else DiskTier(tmp_path, overlap=overlap)
    x = (torch.randn(3, 7, 5) * 100).to(dtype)[:, ::2]  # not contiguous
    back = store.get(store.put(x))  # right after the put: its write may still be running
    assert back.dtype == dtype and back.shape == x.shape and torch.equal(back, x)
    handle = store.put(x)
    assert store.prefetch(handle) is (overlap and tier == "disk")
    assert torch.equal(store.get(handle), x)
    assert torch.equal(store.get(handle), x)  # a second get reads again


def test_disk_files_go_with_their_handles_and_the_directory_with_the_tier(tmp_path):
    store = DiskTier(tmp_path / "offload")
    first, second = store.put(torch.ones(4)), store.put(torch.zeros(2))
    store.flush()
    assert sorted(p.name for p in store.directory.iterdir()) == ["0.bin", "1.bin"]
    del first
    assert [p.name for p in store.directory.iterdir()] == ["1.bin"]
    assert torch.equal(store.get(second), torch.zeros(2))
    store.close()
    assert not (tmp_path / "offload").exists()  # its own directory, then the emptied parent


@pytest.fixture
def gated_writes(monkeypatch):
    """Disk tiers made after this write only once the returned event is set (a write that is still running)."""
    gate = threading.Event()
    original = offload._write_file

    def write(entry, tensor):
        assert gate.wait(10)
        original(entry, tensor)

    monkeypatch.setattr(offload, "_write_file", write)
    return gate


def _still_blocked(call) -> threading.Thread:
    """`call` in a thread that is still running 0.2 s later."""
    thread = threading.Thread(target=call)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()
    return thread


def test_a_handle_dropped_before_its_write_ends_leaves_no_file(tmp_path, gated_writes):
    store = DiskTier(tmp_path)
    kept, dropped = store.put(torch.ones(8)), store.put(torch.zeros(8))
    assert dropped.entry.writing
    del dropped
    gated_writes.set()
    store.flush()
    assert [p.name for p in store.directory.iterdir()] == ["0.bin"]
    assert torch.equal(store.get(kept), torch.ones(8))
    assert store._io.in_flight == 0


def test_close_waits_for_the_writes_then_removes_the_directory(tmp_path, gated_writes):
    store = DiskTier(tmp_path / "offload")
    handle = store.put(torch.ones(8))
    closing = _still_blocked(store.close)
    gated_writes.set()
    closing.join(10)
    assert not closing.is_alive() and not handle.entry.writing and not (tmp_path / "offload").exists()


def test_a_failed_background_write_is_raised_by_the_next_call_and_by_its_get(tmp_path, monkeypatch):
    def full_disk(entry, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offload, "_write_file", full_disk)
    store = DiskTier(tmp_path)
    handle = store.put(torch.ones(8))
    handle.entry.write.result()  # the write has ended (failed)
    with pytest.raises(RuntimeError, match="an offload write failed.*No space left"):
        store.put(torch.ones(8))
    with pytest.raises(OSError, match="No space left"):
        store.get(handle)


def test_bytes_in_flight_stay_within_the_bound(tmp_path, gated_writes):
    nbytes = 8 * 4
    store = DiskTier(tmp_path, max_bytes=3 * nbytes)
    handles = [store.put(torch.full((8,), float(i))) for i in range(3)]
    assert store._io.in_flight == 3 * nbytes
    fourth = []
    putting = _still_blocked(lambda: fourth.append(store.put(torch.full((8,), 3.0))))  # waits for room
    assert store._io.in_flight == 3 * nbytes
    gated_writes.set()
    putting.join(10)
    handles += fourth
    store.flush()
    assert store._io.in_flight == 0
    big = store.put(torch.ones(4 * 8))  # larger than the bound: written in the caller
    assert big.entry.write is None and store._io.in_flight == 0
    # Prefetched reads hold their bytes until taken: the third does not fit (and does not wait).
    assert [store.prefetch(h) for h in handles[:3]] == [True, True, True]
    assert store.prefetch(handles[3]) is False
    assert torch.equal(store.get(handles[0]), torch.zeros(8))
    assert store.prefetch(handles[3]) is True
    del handles[1]  # prefetched, never taken: its bytes come back with the handle
    for value, handle in zip((2.0, 3.0), handles[1:], strict=True):
        assert torch.equal(store.get(handle), torch.full((8,), value))
    store.close()
    assert store._io.in_flight == 0


def test_read_all_reads_ahead_in_order(tmp_path):
    store = DiskTier(tmp_path, max_bytes=2 * 8 * 4)
    tensors = [torch.full((8,), float(i)) for i in range(5)]
    handles = [store.put(t) for t in tensors]
    for want, got in zip(tensors, read_all(store, handles), strict=True):
        assert torch.equal(got, want) and store._io.in_flight <= store._io.max_bytes
    assert handles == [None] * 5 and not list(store.directory.iterdir())


def test_offload_wait_seconds_counts_time_blocked_in_tier_calls(tmp_path, gated_writes):
    store = DiskTier(tmp_path)
    handle = store.put(torch.ones(8))
    before = offload_wait_seconds()
    threading.Timer(0.3, gated_writes.set).start()
    store.get(handle)  # waits for the write
    assert offload_wait_seconds() - before >= 0.25


def _tiny(layers: int = 2):
    source = resolve_model_source("tiny-llama")
    return build_model(source, build_config(source, 300, {"num_hidden_layers": layers}), device="cpu",
                       attn_implementation="sdpa", seed=0)


def test_checkpoint_offload_to_disk_gives_identical_gradients(tmp_path):
    ids = torch.randint(3, 300, (2, 48))

    def grads(settings):
        model = _tiny()
        apply_recompute(model.model.layers, settings)
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}

    base = grads(recompute("none"))
    seen, prefetched = [], []
    original_put, original_prefetch = DiskTier.put, DiskTier.prefetch

    def counting_put(self, tensor):
        seen.append(tensor.shape)
        return original_put(self, tensor)

    def counting_prefetch(self, handle):
        prefetched.append(handle.entry.place.name)
        return original_prefetch(self, handle)

    DiskTier.put, DiskTier.prefetch = counting_put, counting_prefetch
    try:
        got = grads(recompute("full", offload_checkpoints=True, offload_dir=str(tmp_path)))
    finally:
        DiskTier.put, DiskTier.prefetch = original_put, original_prefetch
    hidden = _tiny().config.hidden_size
    assert seen == [torch.Size([2, 48, hidden])] * 2  # the two layers' input hidden states, nothing else
    assert prefetched == ["0.bin"]  # layer 0's input, read ahead when backward took layer 1's
    for name in base:
        torch.testing.assert_close(got[name], base[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_swapped_adamw_steps_exactly_like_adamw(tier, tmp_path):
    plain, swapped = _tiny(), _tiny()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (plain, swapped)]
    swap = OptimizerStateSwap(opts[1], HostTier() if tier == "host" else DiskTier(tmp_path))
    for _ in range(3):
        ids = torch.randint(3, 300, (2, 32))
        for model, opt in zip((plain, swapped), opts, strict=True):
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
            if opt is opts[1]:
                swap.swap_in()
            opt.step()
            opt.zero_grad(set_to_none=True)
        swap.swap_out()
        state = next(iter(opts[1].state.values()))
        assert not isinstance(state["exp_avg"], torch.Tensor)  # out of the device between steps
        assert isinstance(state["step"], torch.Tensor)  # the scalar step count stays
    for a, b in zip(plain.parameters(), swapped.parameters(), strict=True):
        assert torch.equal(a, b)
    with swap.resident():
        for pa, pb in zip(plain.parameters(), swapped.parameters(), strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opts[0].state[pa][key], opts[1].state[pb][key])
    assert swap.swapped_out


def _backend(swap_dir, gradient_offload_dir=None) -> NativeBackend:
    layout = Layout(micro_batch=2, dtype="float32", optimizer_swap=swap_dir is not None,
                    offload_gradients=gradient_offload_dir is not None,
                    offload_tier="disk" if swap_dir or gradient_offload_dir else "host",
                    offload_dir=swap_dir or gradient_offload_dir)
    return NativeBackend(SETTINGS, layout, ParallelDims(world_size=1), torch.device("cpu"), lambda device: _tiny())


def _train(backend: NativeBackend, batches) -> None:
    for ids in batches:
        backend.backward(backend.forward(input_ids=ids).float().logsumexp(-1).mean(), last_micro_batch=True)
        backend.step()


def test_native_backend_with_optimizer_swap_checkpoints_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randint(3, 300, (2, 32)) for _ in range(4)]
    plain, swapped = _backend(None), _backend(str(tmp_path / "swap"))
    _train(plain, batches[:2])
    _train(swapped, batches[:2])
    (tmp_path / "ckpt").mkdir()
    swapped.save_checkpoint(tmp_path / "ckpt")
    assert swapped._swaps[0].swapped_out  # saving brought the state back, then out again
    resumed = _backend(str(tmp_path / "swap2"))
    resumed.load_checkpoint(tmp_path / "ckpt")
    for backend in (plain, swapped, resumed):
        _train(backend, batches[2:])
    for a, b, c in zip(plain.model.parameters(), swapped.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_gradient_offload_gives_the_same_gradients_over_micro_batches(tier, tmp_path):
    torch.manual_seed(0)
    micro_batches = [torch.randint(3, 300, (2, 24)) for _ in range(3)]
    plain, offloaded = _tiny(), _tiny()
    offload = GradientOffload(list(offloaded.parameters()), HostTier() if tier == "host" else DiskTier(tmp_path))
    for ids in micro_batches:
        for model in (plain, offloaded):
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        # Between micro-batches every gradient is in the tier, none on the model.
        assert all(p.grad is None for p in offloaded.parameters())
        assert offload.pending == len(list(offloaded.parameters()))
    if tier == "disk":  # one file per parameter: each micro-batch's sum replaced the previous one
        offload.tier.flush()  # the writes behind have landed
        assert len(list(offload.tier.directory.iterdir())) == offload.pending
    offload.restore()
    assert offload.pending == 0
    for (name, a), b in zip(plain.named_parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name  # old + new, as autograd accumulates: bit for bit
    if tier == "disk":
        assert not list(offload.tier.directory.iterdir())
    offload.remove()
    offloaded(input_ids=micro_batches[0]).logits.sum().backward()
    assert offload.pending == 0 and all(p.grad is not None for p in offloaded.parameters())


def test_native_backend_with_gradient_offload_trains_exactly_like_the_plain_one(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randint(3, 300, (2, 32)) for _ in range(3)]
    plain = _backend(None)
    offloaded = _backend(None, gradient_offload_dir=str(tmp_path / "grads"))
    for backend in (plain, offloaded):
        _train(backend, batches)
    assert offloaded._grad_offload.pending == 0
    for a, b in zip(plain.model.parameters(), offloaded.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_overlapped_offload_to_disk_trains_bit_for_bit_like_synchronous_offload(tmp_path, monkeypatch):
    """Checkpoints, optimizer state and gradients on disk, with and without overlap, against no offload."""
    torch.manual_seed(0)
    batches = [torch.randint(3, 300, (2, 32)) for _ in range(3)]
    layouts = {name: Layout(micro_batch=2, dtype="float32", recompute="full", offload_checkpoints=on,
                            optimizer_swap=on, offload_gradients=on, offload_tier="disk" if on else "host",
                            offload_dir=str(tmp_path / name) if on else None)
               for name, on in (("plain", False), ("sync", True), ("overlap", True))}
    backends = {}
    for name, layout in layouts.items():
        monkeypatch.setenv("LONGTUNE_OFFLOAD_OVERLAP", "0" if name == "sync" else "1")
        backends[name] = NativeBackend(SETTINGS, layout, ParallelDims(world_size=1), torch.device("cpu"),
                                       lambda device: _tiny())
        _train(backends[name], batches)
    assert [backends[n]._grad_offload.tier._io.overlap for n in ("sync", "overlap")] == [False, True]
    models = [backend.model for backend in backends.values()]
    for a, b, c in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_gradient_offload_refuses_several_processes():
    layout = Layout(dp=2, micro_batch=2, dtype="float32", offload_gradients=True)
    with pytest.raises(ValueError, match="memory.offload.gradients is for one process"):
        NativeBackend(SETTINGS, layout, ParallelDims(world_size=2, dp=2), torch.device("cpu"), lambda device: _tiny())
