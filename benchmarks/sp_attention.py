"""Sequence-parallel benchmark: per-rank peak memory and tokens/s of one model step.

    /work/venv/bin/python benchmarks/sp_attention.py [--seq-len 8192] [--out docs/benchmarks/sp_attention.md]

Launched once, it runs (one after the other, never two at a time):

* sp = 1: the model with HF `sdpa` in a single process (the baseline), plus the fused CPU flash
  kernel alone (`_scaled_dot_product_flash_attention_for_cpu` + backward) on the full sequence;
* at sp = 2 and 4 (one torchrun each, gloo), in the same processes: longtune `longtune_sp` —
  ulysses, ring (contiguous layout), zigzag, and at sp = 4 the 2 × 2 hybrid (Ulysses 2 inside a
  zigzag ring of 2) — and DeepSpeed ALST Ulysses (`UlyssesSPAttentionHF.register_with_transformers(
  model, "sdpa", ...)`, which replaces `sdpa` process-wide; the longtune models call `longtune_sp`
  and are unaffected); plus the ring / zigzag attention alone (`RingAttention.apply`) at equal
  total work.

What one "step" is, for every mode: forward + backward of the whole model (embedding, decoder
layers, LM head, token cross-entropy summed over local tokens / global token count) on this rank's
shard of one row of `--seq-len` tokens (a single document, so every mode computes the same causal
attention). No optimizer step and no gradient all-reduce — neither library's attention needs one
and both would pay the same. DeepSpeed is called without an engine: the registered attention runs
inside the HF model on pre-sharded contiguous inputs (what `UlyssesSPDataLoaderAdapter` produces).

Memory: peak bytes of live torch CPU allocations during one step minus those live before it, from
the torch profiler's memory events (`profile_memory=True`), on the step after a warm-up step
(parameter gradients are pre-allocated, and the first step's one-off allocations are not counted),
so the figure is activations + temporaries + communication buffers torch allocates. The profiler
records a free only on the thread that runs the profiled code; gloo's worker thread drops its
reference to a collective's buffers a moment after the call returns, and when that is the last
reference the free goes unrecorded and the buffer looks alive to the end of the step (which
inflated earlier runs by 4-12 MiB per rank, differently on every rank and run). During the profiled
step `all_to_all_single` and the point-to-point waits therefore wait until gloo has let go of their
tensors, so every free happens, and is recorded, on the calling thread; every step's recorded
allocations must net to zero, and the report says so. Peak RSS growth (VmHWM after resetting it via
/proc/self/clear_refs) is reported too; it also sees allocator and gloo buffers but is noisier.
Time: wall time of the step, slowest rank, median over `--repeats` rounds after the warm-up, where
one round runs one step of every mode in turn, so drift in the machine's load hits every mode alike;
tokens/s = total tokens / that time. Every rank runs with one intra-op thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
VOCAB = 1024
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=65536)
DEEPSPEED_MODE = "DeepSpeed UlyssesSPAttentionHF"
LONGTUNE_MODES = {  # name -> {world: (ulysses, ring, layout)}
    "ulysses": {2: (2, 1, "contiguous"), 4: (4, 1, "contiguous")},
    "ring": {2: (1, 2, "contiguous"), 4: (1, 4, "contiguous")},
    "zigzag": {2: (1, 2, "zigzag"), 4: (1, 4, "zigzag")},
    "hybrid 2×2": {4: (2, 2, "zigzag")},
}


# ---------------------------------------------------------------------------------------------------
# Measurement helpers (run inside the workers)
# ---------------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _profiled_peak(fn) -> tuple[float, float]:
    """(peak MiB of live torch CPU allocations above the start, peak RSS growth MiB) while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    try:  # hand freed heap pages back first, so the RSS rise reflects this step's pages
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    can_reset = _reset_hwm()
    rss0 = _rss_kib("VmRSS")
    with _frees_on_this_thread(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    hwm = _rss_kib("VmHWM") if can_reset else float("nan")
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20, (hwm - rss0) / 1024, live / 2**20


def _until_released(tensors: list, counts: list[int]) -> None:
    """Wait (10 s at most) until gloo holds no more references to `tensors` than before the call."""
    deadline = time.perf_counter() + 10
    while any(t._use_count() > n for t, n in zip(tensors, counts, strict=True)) and time.perf_counter() < deadline:
        time.sleep(0)


class _ReleasedWork:
    """A point-to-point work whose wait() drops the work and waits for gloo to drop its tensor."""

    def __init__(self, work, tensor, count: int):
        self.work, self.tensor, self.count = work, tensor, count

    def wait(self, *args, **kwargs):
        result = self.work.wait(*args, **kwargs)
        self.work = None
        _until_released([self.tensor], [self.count])
        return result


@contextlib.contextmanager
def _frees_on_this_thread():
    """Make gloo's collectives hand their buffers back before the caller goes on.

    `all_to_all_single` returns, and each work of `batch_isend_irecv` finishes waiting, only once gloo
    has dropped its tensor references; the caller then holds the last reference to the send and receive
    buffers and frees them on the profiled thread (see the module docstring). Costs microseconds; used
    for the memory step only.
    """
    import torch.distributed as dist

    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def all_to_all_single(output, input, *args, **kwargs):
        if kwargs.get("async_op"):
            return a2a(output, input, *args, **kwargs)
        counts = [output._use_count(), input._use_count()]
        work = a2a(output, input, *args, **kwargs)
        if work is not None:
            work.wait()
            del work
        _until_released([output, input], counts)
        return None

    def batch_isend_irecv(p2p_op_list):
        counts = [op.tensor._use_count() for op in p2p_op_list]
        works = batch(p2p_op_list)  # gloo: one work per op, in order
        return [_ReleasedWork(w, op.tensor, n) for w, op, n in zip(works, p2p_op_list, counts, strict=True)]

    dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
    try:
        yield
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


def _prealloc_grads(model) -> None:
    for p in model.parameters():
        p.grad = _torch().zeros_like(p)


def _torch():
    import torch
    return torch


def _timed(fn, repeats: int, sync) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(sync(time.perf_counter() - t0))
    return times


def _model(attn: str):
    from longtune.train.model import build_config, build_model, resolve_model_source

    source = resolve_model_source("tiny-llama")
    config = build_config(source, VOCAB, MODEL)
    return build_model(source, config, device="cpu", attn_implementation=attn, seed=11)


def _tokens(seq_len: int):
    torch = _torch()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, seq_len + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.arange(seq_len).unsqueeze(0)


def _attn_inputs(seq_len: int, requires_grad: bool = False):
    torch = _torch()
    g = torch.Generator().manual_seed(5)
    h, kv, d = MODEL["num_attention_heads"], MODEL["num_key_value_heads"], MODEL["head_dim"]
    q = torch.randn(1, h, seq_len, d, generator=g)
    k = torch.randn(1, kv, seq_len, d, generator=g)
    v = torch.randn(1, kv, seq_len, d, generator=g)
    return q, k, v


# ---------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------

def worker_single(args) -> dict:
    """sp = 1: the HF model with sdpa, and the fused CPU flash kernel alone."""
    torch = _torch()
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model = _model("sdpa")
    ids, labels, pos = _tokens(args.seq_len)
    count = labels.numel()

    def step():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / count
        loss.backward()

    _prealloc_grads(model)
    step()  # warm-up
    mem, rss, net = _profiled_peak(step)
    times = _timed(step, args.repeats, lambda t=None: t)
    results = {"model": {"mode": "sdpa (single process)", "sp": 1, "mem": [mem], "rss": [rss], "net": [net],
                         "times": times}}

    q, k, v = _attn_inputs(args.seq_len)
    scale = MODEL["head_dim"] ** -0.5

    def attn():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                               scale=scale)[:2]
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(out, q, k, v, out, lse, 0.0,
                                                                            True, scale=scale)

    attn()  # warm-up
    cpu0 = time.process_time()
    a_times = _timed(attn, args.repeats, lambda t=None: t)
    results["attn"] = {"mode": "fused CPU flash", "sp": 1, "times": a_times,
                       "cpu": [(time.process_time() - cpu0) / args.repeats]}
    return results


def _dist_sync():
    torch = _torch()
    import torch.distributed as dist

    def sync(value=None):
        if value is None:
            dist.barrier()
            return None
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()
    return sync


def _gather(value: float) -> list[float]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _longtune_step(name: str, world: int, rank: int, ids, labels, pos, count: int):
    """The step of one longtune mode: its model on this rank's shard."""
    torch = _torch()
    import torch.nn.functional as F

    from longtune.parallel.dims import ParallelDims, build_mesh
    from longtune.parallel.sp_attention import ATTN_IMPLEMENTATION
    from longtune.parallel.sp_input import shard_micro_batch

    uly, ring, layout = LONGTUNE_MODES[name][world]
    model = _model("sdpa")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    dims = ParallelDims(world, sp_ring=ring, sp_ulysses=uly)
    mesh = build_mesh(dims, "cpu")
    groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    shard = shard_micro_batch(ids, labels, pos, torch.ones_like(ids, dtype=torch.bool), dims=dims,
                              rank=rank, layout=layout, pad_id=0, groups=groups)

    def step():
        logits = model(input_ids=shard.input_ids, position_ids=shard.position_ids, use_cache=False,
                       sp_context=shard.context).logits
        loss = F.cross_entropy(logits.flatten(0, 1), shard.labels.flatten(), reduction="sum") / count
        loss.backward()

    _prealloc_grads(model)
    return step


def _deepspeed_step(seq_len: int, world: int, rank: int, ids, labels, pos, count: int):
    """DeepSpeed's Ulysses on the HF model, fed contiguous shards as its data loader adapter would."""
    import deepspeed.comm as ds_dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    model = _model("sdpa")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation="sdpa", sequence_parallel_size=world, micro_batch_size=1,
        seq_length=seq_len, seq_length_is_variable=False)
    assert ds_dist.get_world_size(mpu.get_sequence_parallel_group()) == world
    local = seq_len // world
    part = slice(rank * local, (rank + 1) * local)
    s_ids, s_labels, s_pos = (t[:, part].contiguous() for t in (ids, labels, pos))

    def step():
        logits = model(input_ids=s_ids, position_ids=s_pos, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), s_labels.flatten(), reduction="sum") / count
        loss.backward()

    _prealloc_grads(model)
    return step


def worker_sp(args) -> dict:
    """Every longtune mode for this world size and DeepSpeed's Ulysses, in one process per rank."""
    torch = _torch()
    import deepspeed
    import torch.distributed as dist

    from longtune.parallel.kernels import get_kernel
    from longtune.parallel.ring_attention import RingAttention, RingPlan
    from longtune.parallel.sharding import shard_sequence

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = _dist_sync()
    ids, labels, pos = _tokens(args.seq_len)
    count = labels.numel()
    steps = {f"longtune {name}": _longtune_step(name, world, rank, ids, labels, pos, count)
             for name, per_world in LONGTUNE_MODES.items() if world in per_world}
    # Registered last: it replaces `sdpa` in transformers' attention registry for the whole process.
    steps[DEEPSPEED_MODE] = _deepspeed_step(args.seq_len, world, rank, ids, labels, pos, count)

    results = {}
    for mode, step in steps.items():  # a warm-up step, then the profiled one
        step()
        sync()
        mem, rss, net = _profiled_peak(step)
        results[mode] = {"mode": mode, "sp": world, "mem": _gather(mem), "rss": _gather(rss),
                         "net": _gather(net), "times": []}
    for _ in range(args.repeats):  # rounds: one step of every mode
        for mode, step in steps.items():
            results[mode]["times"] += _timed(step, 1, sync)
    results = {f"model:{mode}": r for mode, r in results.items()}

    # Attention alone: RingAttention fwd+bwd on this rank's shard of the full q/k/v.
    q, k, v = _attn_inputs(args.seq_len)
    scale = MODEL["head_dim"] ** -0.5
    kernel = get_kernel("torch_cpu", torch.device("cpu"))
    for name, layout in (("ring", "contiguous"), ("zigzag", "zigzag")):
        shards = [shard_sequence(t, layout, world, rank, 1, 0, dim=2).requires_grad_() for t in (q, k, v)]
        plan = RingPlan(layout, world, rank, args.seq_len, (((0, args.seq_len),),), scale, kernel, None)

        def attn(shards=shards, plan=plan):
            out = RingAttention.apply(*shards, plan)
            out.backward(out.detach())

        attn()  # warm-up
        sync()
        cpu0 = time.process_time()
        a_times = _timed(attn, args.repeats, sync)
        cpu = (time.process_time() - cpu0) / args.repeats
        results[f"attn:{name}"] = {"mode": f"longtune {name} attention", "sp": world, "times": a_times,
                                   "cpu": _gather(cpu)}
    return results


def run_worker(args) -> None:
    fn = {"single": worker_single, "sp": worker_sp}[args.role]
    results = fn(args)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))
    if args.role != "single":
        import torch.distributed as dist
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip slow process-group teardown


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------

def launch(role: str, world: int, args, tmp: Path) -> dict:
    result = tmp / f"{role}-{world}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    tail = [str(SCRIPT), "--role", role, "--result", str(result), "--seq-len", str(args.seq_len),
            "--repeats", str(args.repeats)]
    if world == 1:
        cmd = [sys.executable, *tail]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               *tail]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{role} at sp={world} failed (exit {proc.returncode})")
    print(f"  {role:9s} sp={world}: {time.perf_counter() - t0:5.1f} s", file=sys.stderr, flush=True)
    return json.loads(result.read_text())


def build_report(res: dict, args, elapsed: float, command: str) -> str:
    L = args.seq_len
    single = res["single"]["model"]
    base_mem = single["mem"][0]
    base_rate = L / statistics.median(single["times"])
    ds = {sp: res[f"sp-{sp}"][f"model:{DEEPSPEED_MODE}"] for sp in (2, 4)}
    rows = [single]
    for sp in (2, 4):
        rows += [v for k, v in res[f"sp-{sp}"].items() if k.startswith("model:")]
    cores = os.cpu_count() or 1
    unaccounted = max(abs(x) for r in rows for x in r["net"])

    lines = ["| mode | sp | per-rank peak MiB (max rank) | ÷ (sp=1 / N) | peak RSS growth MiB | tokens/s "
             "| vs sp=1 | vs DeepSpeed Ulysses, same sp (range over rounds) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["sp"]
        mem = max(r["mem"])
        rate = L / statistics.median(r["times"])
        if sp in ds:
            vs_ds = statistics.median(ds[sp]["times"]) / statistics.median(r["times"])
            per_round = [d / t for d, t in zip(ds[sp]["times"], r["times"], strict=True)]
            vs_ds_text = f"{vs_ds:.2f} ({min(per_round):.2f}–{max(per_round):.2f})"
        else:
            vs_ds_text = "—"
        oversub = " †" if sp > cores else ""
        lines.append(f"| {r['mode']} | {sp}{oversub} | {mem:.1f} | {mem / (base_mem / sp):.2f} | "
                     f"{max(r['rss']):.0f} | {rate:,.0f} | {rate / base_rate:.2f} | {vs_ds_text} |")

    attn_single = res["single"]["attn"]
    t1 = statistics.median(attn_single["times"])
    cpu1 = attn_single["cpu"][0]
    alines = ["| attention fwd+bwd | sp | wall s (slowest rank) | CPU s summed over ranks | "
              "efficiency by wall, per core | efficiency by CPU time |", "|---|---|---|---|---|---|",
              f"| fused CPU flash, one process | 1 | {t1:.2f} | {cpu1:.2f} | 1.00 | 1.00 |"]
    for sp in (2, 4):
        for name in ("ring", "zigzag"):
            r = res[f"sp-{sp}"][f"attn:{name}"]
            t = statistics.median(r["times"])
            used = min(sp, cores)  # cores the ranks can actually run on
            eff_wall = t1 / (t * used)
            eff_cpu = cpu1 / sum(r["cpu"])
            oversub = " †" if sp > cores else ""
            alines.append(f"| {r['mode']} | {sp}{oversub} | {t:.2f} | {sum(r['cpu']):.2f} | {eff_wall:.2f} | "
                          f"{eff_cpu:.2f} |")

    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    import deepspeed
    import torch
    import transformers
    header = [
        "# Sequence-parallel benchmark",
        "",
        f"Command: `{command}` (finished in {elapsed:.0f} s)",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. Machine: {platform.node() or '?'}, "
        f"{platform.processor() or platform.machine()}, {cores} CPU cores shared with other jobs (load average "
        f"at the end {load}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"deepspeed {deepspeed.__version__}, gloo, one intra-op thread per rank, fp32.",
        "",
        f"Model: Llama built from config — hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} query / {MODEL['num_key_value_heads']} KV heads of {MODEL['head_dim']}, "
        f"MLP {MODEL['intermediate_size']}, vocab {VOCAB}. One row of {L} tokens, batch 1, one document. "
        f"Step = forward + backward of the whole model and the loss on each rank's shard (no optimizer, no "
        f"gradient all-reduce); tokens/s = {L} / wall time of the slowest rank, median of {args.repeats} rounds "
        "after a warm-up step. At each sp, longtune's modes and DeepSpeed run in the same processes and one "
        "round times one step of each in turn, so a change in the machine's load hits all of them; the DeepSpeed "
        "column is DeepSpeed's median step time over the mode's, with the range of the per-round ratios.",
        "",
        "Per-rank peak MiB: the largest rank's peak of live torch CPU allocations during a step (the one after "
        "a warm-up step) above what was live before it (torch profiler memory events; parameter gradients "
        "pre-allocated), i.e. activations, temporaries and torch-side communication buffers. The profiler "
        "records frees only on the profiled thread, so during this step `all_to_all_single` and the "
        "point-to-point waits wait until gloo's worker thread has dropped its references and the buffers are "
        "freed on the calling thread; recorded allocations then net to "
        f"zero over the step (largest remainder over all rows and ranks: {unaccounted:.2f} MiB). Peak RSS growth "
        "is the VmHWM rise over the step; it includes glibc/gloo buffers and newly touched pages (the heap is "
        "trimmed with malloc_trim before the step). `÷ (sp=1 / N)` is the per-rank peak divided by the sp = 1 "
        "peak over N (target ≤ 1.1).",
        "",
        f"† sp = 4 runs 4 ranks on {cores} cores: the machine is oversubscribed, so sp = 4 tokens/s is bounded "
        f"by {cores} cores, not 4. At sp = 2 each rank has one core (when no other job competes).",
        "",
        "## Whole model, forward + backward",
        "",
        *lines,
        "",
        "## Attention alone, forward + backward at equal total work",
        "",
        f"q `[1, {MODEL['num_attention_heads']}, {L}, {MODEL['head_dim']}]`, k/v with {MODEL['num_key_value_heads']} "
        f"heads, causal. The fused kernel runs the whole sequence in one process; `RingAttention.apply` runs the "
        "same attention split over N ranks (each rank's shard, backward included). Efficiency by wall, per "
        "core = t(fused) / (t(ring) × cores used), cores used = min(N, "
        f"{cores}); efficiency by CPU time = CPU s of the fused kernel / CPU s summed over ranks (fair under "
        "oversubscription, but blind to time ranks spend blocked on each other). Target: ≥ 0.85 (within 15 %).",
        "",
        *alines,
        "",
    ]
    return "\n".join(header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "sp_attention.md"),
                        help="Markdown file to write ('' to skip)")
    parser.add_argument("--role", choices=("single", "sp"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_worker(args)
        return
    if args.seq_len % 16:
        raise SystemExit("--seq-len must be a multiple of 16 (zigzag over 4 ranks)")
    t0 = time.perf_counter()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["single"] = launch("single", 1, args, tmp)
        for sp in (2, 4):
            res[f"sp-{sp}"] = launch("sp", sp, args, tmp)
    command = "python benchmarks/sp_attention.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    report = build_report(res, args, time.perf_counter() - t0, command)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Keep the hand-written findings section of an earlier run (it names the run it describes).
        if out.exists() and "\n## Findings" in out.read_text():
            report += "\n## Findings" + out.read_text().split("\n## Findings", 1)[1]
        out.write_text(report)


if __name__ == "__main__":
    main()
