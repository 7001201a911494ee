"""Time model: FLOPs and communication of one optimizer step of a layout, turned into seconds with
measured constants (a calibration file: `longtune plan --calibrate OUT.json`).

step time = compute / achieved FLOP/s + exposed communication + pipeline bubble + host transfers.
Sequence- and tensor-parallel collectives sit on the critical path (the next op needs their result);
the ring's K/V exchange overlaps its block attention; data-parallel gradient traffic overlaps the
backward up to `Calibration.overlap` of it; host and tier copies (offload, a sequence-chunked layout's
K/V) overlap it partly: half counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .layout import Layout
from .memory_model import KV_GRAD_BYTES, ModelShape, chunked, kv_per_token, params_per_rank, tokens_per_rank

GB = 1e9


@dataclass
class Calibration:
    """Achieved rates of one machine type; bandwidths are bytes/s per rank (algorithm bandwidth of a
    collective, what `bytes moved per rank / time` gives)."""

    matmul_flops: float  # dense matmul FLOP/s per rank in the compute dtype
    attention_flops: float  # attention kernel FLOP/s per rank (flash on GPU, torch's CPU flash kernel)
    intra_bw: float  # inside a node (NVLink / shared memory)
    inter_bw: float  # between nodes (InfiniBand / Ethernet)
    latency_s: float = 20e-6  # per collective call
    host_bw: float = 25 * GB  # device ↔ host copies (PCIe, pinned); on CPU a memcpy
    # device ↔ the disk offload tier (memory.offload.tier=disk): one Gen4 NVMe drive per GPU reads ~7 GB/s and
    # writes ~4 GB/s sequentially; the tier's traffic is reads and writes of large files: 4 GB/s.
    disk_bw: float = 4 * GB
    host_adam_params_per_s: float = 2e9  # CPU AdamW (DeepSpeedCPUAdam / torch) parameters per second
    overlap: float = 0.8  # fraction of data-parallel traffic hidden behind backward compute
    # The attention kernel's FLOP/s by the length of the rows it is called on ({"2048": ...}): tile overheads
    # amortise over longer rows (torch's CPU flash kernel: 28 GFLOP/s at 1K, 43 at 8K). Empty: attention_flops.
    attention_flops_by_length: dict[str, float] = field(default_factory=dict)
    gpus_per_node: int = 8
    source: str = "default"
    notes: dict = field(default_factory=dict)

    @classmethod
    def gpu_default(cls) -> Calibration:
        """H100-SXM-class guesses, not measured: 40 % of the 989 TFLOP/s bf16 peak for matmuls, flash
        attention ~350 TFLOP/s, NVLink ~300 GB/s and 8 × 400 Gb/s InfiniBand ≈ 40 GB/s per GPU achieved."""
        return cls(matmul_flops=400e12, attention_flops=350e12, intra_bw=300 * GB, inter_bw=40 * GB,
                   latency_s=20e-6, host_bw=25 * GB, host_adam_params_per_s=2e9, overlap=0.8,
                   source="built-in H100 guesses (not measured)")

    @classmethod
    def cpu_default(cls) -> Calibration:
        """One CPU core per rank, gloo over shared memory: rough figures; measure with --calibrate."""
        return cls(matmul_flops=30e9, attention_flops=10e9, intra_bw=1 * GB, inter_bw=0.1 * GB, latency_s=1e-4,
                   host_bw=5 * GB, host_adam_params_per_s=1e8, overlap=0.0, gpus_per_node=2,
                   source="built-in CPU guesses (not measured)")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"calibration {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        return cls(**data)

    def attention_rate(self, length: float) -> float:
        """Attention FLOP/s for kernel calls over rows of `length`: log-linear between the calibrated
        lengths, the nearest one's rate outside them."""
        if not self.attention_flops_by_length:
            return self.attention_flops
        points = sorted((int(k), v) for k, v in self.attention_flops_by_length.items())
        if length <= points[0][0]:
            return points[0][1]
        for (l0, r0), (l1, r1) in zip(points, points[1:], strict=False):
            if length <= l1:
                return r0 + (r1 - r0) * math.log(length / l0) / math.log(l1 / l0)
        return points[-1][1]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


@dataclass
class StepEstimate:
    seconds: float
    tokens: float  # tokens per optimizer step over the whole world
    terms: dict[str, float]  # seconds per named term

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def dense_flops_per_token(shape: ModelShape) -> float:
    """Forward FLOPs per token of the matmuls: 2 × parameters (embedding lookups excluded)."""
    return 2 * (shape.params - shape.embedding_params)


def attention_flops_per_sequence(shape: ModelShape, seq_len: int, causal: bool = True, doc_fill: float = 1.0
                                 ) -> float:
    """Forward FLOPs of QKᵀ and PV of one sequence over all layers: 4 · L² · q_width per layer, halved
    by a causal kernel that skips masked blocks (transformers' sdpa with a document mask does not).

    `doc_fill` is the share of the row's L² inside its documents, Σ dᵢ² / L² (`document_fill`); a kernel
    that skips masked blocks computes only those (longtune's block kernels, one call per document).
    """
    full = 4 * seq_len**2 * shape.q_width * shape.layers
    return full / 2 * doc_fill if causal else full


def document_fill(doc_lens: Iterable[Sequence[int]], seq_len: int) -> float:
    """Mean over rows of Σ dᵢ² / L²: the share of causal attention work a document-masked row keeps
    (1.0 when one document fills the row; packed short documents make it small)."""
    fills = [sum(d * d for d in lens) / seq_len**2 for lens in doc_lens]
    if not fills:
        raise ValueError("document_fill needs at least one row")
    return sum(fills) / len(fills)


def forward_multiplier(layout: Layout, part: str) -> float:
    """Forward passes per step of `part` (dense | attention | mlp | head), counting the backward as
    two: 3, plus one more forward for what is recomputed (a tiled MLP inside a recomputed layer runs
    its forward twice more: the layer's recomputation and the chunk's own). A sequence-chunked layer is
    recomputed once, as under full recompute (it is not also checkpointed); its block attention does the
    causal FLOPs of the unchunked kernel."""
    if part == "head":
        return 3.0 + (1.0 if layout.tiled_loss_chunk else 0.0)
    modules = layout.recompute_modules
    extra = 0.0
    if layout.recompute == "full" or chunked(layout):
        extra = 1.0
    elif layout.recompute == "selective" and modules:
        extra = 1.0 if (part == "mlp" and "mlp" in modules
                        or part in ("dense", "attention") and "self_attn" in modules) else 0.0
    elif layout.recompute == "selective":
        extra = 1.0 / layout.recompute_every
    if part == "mlp" and layout.tiled_mlp_chunk:
        extra += 1.0
    return 3.0 + extra


def step_flops(shape: ModelShape, layout: Layout, seq_len: int, doc_fill: float = 1.0) -> tuple[float, float]:
    """(dense, attention) FLOPs per rank of one optimizer step (all micro-batches); `doc_fill`: see
    `attention_flops_per_sequence` (used with layout.attention == "flash" only)."""
    rows = layout.micro_batch * layout.grad_accum  # per dp replica
    tokens = rows * seq_len
    h, inter = shape.hidden, shape.intermediate
    mlp = 2 * 3 * h * inter * shape.layers
    head = 2 * (shape.vocab * h)
    rest = dense_flops_per_token(shape) - mlp - head
    dense = tokens * (rest * forward_multiplier(layout, "dense") + mlp * forward_multiplier(layout, "mlp")
                      + head * forward_multiplier(layout, "head"))
    flash = layout.attention == "flash" or chunked(layout)  # a chunked layer's block kernel skips masked blocks
    attn = rows * attention_flops_per_sequence(shape, seq_len, causal=flash, doc_fill=doc_fill if flash else 1.0)
    attn *= forward_multiplier(layout, "attention")
    # sp, tp and pp split one replica's work; dp replicas work on other rows.
    split = layout.sp * layout.tp * layout.pp
    return dense / split, attn / split


def _bandwidth(layout: Layout, dim: str, cal: Calibration, gpus_per_node: int) -> float:
    """Links of a mesh dimension: inside a node when it and every inner dimension fit in one node (mesh
    order pp, dp, sp_ring, sp_ulysses, tp: the innermost get the fastest links)."""
    order = ["tp", "sp_ulysses", "sp_ring", "dp", "pp"]
    span = 1
    for name in order:
        span *= {"sp_ulysses": layout.sp_ulysses, "sp_ring": layout.sp_ring}.get(name, getattr(layout, name, 1))
        if name == dim:
            break
    return cal.intra_bw if span <= gpus_per_node else cal.inter_bw


def communication(shape: ModelShape, layout: Layout, seq_len: int, cal: Calibration,
                  gpus_per_node: int | None = None) -> dict[str, float]:
    """Seconds per step of each kind of traffic, before overlap (bytes per rank / bandwidth + latency)."""
    gpn = gpus_per_node or cal.gpus_per_node
    b = 2 if layout.dtype == "bfloat16" else 4
    tokens = tokens_per_rank(seq_len, layout)
    micro = layout.grad_accum
    layers = math.ceil(shape.layers / layout.pp)
    recompute = 1 if layout.recompute == "full" or chunked(layout) else 0
    out: dict[str, float] = {}
    u, r = layout.sp_ulysses, layout.sp_ring
    if u > 1:
        # q, k, v in and the output back, each way; backward the same again; recompute repeats the forward.
        # A chunked layer exchanges chunk by chunk: the same bytes in sequence_chunks × the calls.
        kv = math.lcm(shape.kv_heads, u) * shape.head_dim
        per_layer = tokens * b * (shape.q_width + 2 * kv + shape.q_width) / layout.tp * (u - 1) / u
        calls = 4 * (2 + recompute) * layout.sequence_chunks
        out["ulysses_all_to_all"] = micro * layers * ((2 + recompute) * per_layer / _bandwidth(
            layout, "sp_ulysses", cal, gpn) + calls * cal.latency_s)
    if r > 1:
        # r - 1 K/V blocks received forward; backward also the travelling dK/dV: 3 × the forward.
        block = tokens * b * 2 * shape.kv_width / layout.tp
        steps = (r - 1) * (3 + 1 * recompute)
        out["ring_p2p"] = micro * layers * (steps * block / _bandwidth(layout, "sp_ring", cal, gpn)
                                            + steps * cal.latency_s)
    if layout.tp > 1:
        # Two all-reduces (or reduce-scatter + all-gather pairs) per layer forward, two backward.
        volume = tokens * b * shape.hidden * 2 * (layout.tp - 1) / layout.tp
        calls = 4 + 2 * recompute
        out["tp_collectives"] = micro * layers * calls * (volume / _bandwidth(layout, "tp", cal, gpn)
                                                          + cal.latency_s)
    group = layout.shard_group
    if group > 1:
        p = params_per_rank(shape, layout)
        ring = (group - 1) / group
        bw = _bandwidth(layout, "dp", cal, gpn)
        if layout.sharding in ("fsdp", "zero3"):
            # all-gather forward, all-gather backward (and recompute), reduce-scatter of fp32 gradients.
            volume = p * ring * (b * (2 + recompute) * micro + 4)
        else:
            volume = p * ring * 2 * 4  # all-reduce (zero1/2: reduce-scatter + all-gather, same volume)
        out["data_parallel"] = volume / bw + 2 * shape.layers * cal.latency_s
    if layout.pp > 1:
        out["pp_p2p"] = 2 * micro * tokens * b * shape.hidden / layout.tp / _bandwidth(layout, "pp", cal, gpn)
    return out


def kernel_length(layout: Layout, seq_len: int, doc_fill: float = 1.0) -> float:
    """Length of the rows one attention kernel call sees: the whole row for sdpa with a mask; for the
    block kernels a ring rank's share of it or a sequence-chunked layer's chunk (under Ulysses the global
    chunk, L / chunks), and at most the work-weighted mean document length (Σ dᵢ² / Σ dᵢ = doc_fill · L),
    since they are called per document."""
    if layout.attention == "sdpa_masked" and not chunked(layout):
        return float(seq_len)
    return min(seq_len / (layout.sp_ring * layout.sequence_chunks), doc_fill * seq_len)


def tier_bandwidth(layout: Layout, cal: Calibration) -> float:
    """Bytes/s between the device and memory.offload.tier (checkpoints, a chunked layer's K/V)."""
    return cal.disk_bw if layout.offload_tier == "disk" else cal.host_bw


def chunked_kv_traffic(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Bytes per step and rank a sequence-chunked layout moves between the device and its offload tier.

    Per layer and micro-batch, with C the layer's K/V over all N chunks and the pairs j < i of chunks
    ((N − 1) / 2 × C of K/V read per pass over them): forward writes C and reads chunk j for every later
    chunk i; backward reads it again for chunk i's recomputed forward and for its attention backward, and
    reads and writes the fp32 dK/dV accumulator of j for every such pair (r = 4 / b times K/V's bytes). With
    a ring of R ranks forward writes the ring's R blocks of every chunk and each block reads every earlier one
    of N · R: (N · R − 1) / 2 × C per pass."""
    n = layout.sequence_chunks
    if n == 1:
        return 0.0
    kv = tokens_per_rank(seq_len, layout) * kv_per_token(shape, layout)
    r = KV_GRAD_BYTES / (2 if layout.dtype == "bfloat16" else 4)
    ring = layout.sp_ring
    per_layer = kv * (ring + (n * ring - 1) / 2 * (3 + 2 * r))
    return per_layer * math.ceil(shape.layers / layout.pp) * layout.grad_accum


def step_time(shape: ModelShape, layout: Layout, seq_len: int, cal: Calibration,
              gpus_per_node: int | None = None, doc_fill: float = 1.0) -> StepEstimate:
    """Seconds of one optimizer step and its terms. `doc_fill` (Σ dᵢ² / L² of the packed rows, 1.0: one
    document per row) scales the attention of kernels that skip what the document mask hides."""
    dense, attn = step_flops(shape, layout, seq_len, doc_fill)
    terms = {"dense_compute": dense / cal.matmul_flops,
             "attention_compute": attn / cal.attention_rate(kernel_length(layout, seq_len, doc_fill))}
    compute = terms["dense_compute"] + terms["attention_compute"]
    comm = communication(shape, layout, seq_len, cal, gpus_per_node)
    for name, seconds in comm.items():
        if name == "data_parallel":
            # Overlaps the backward (about 2/3 of the compute).
            terms[name] = max(0.0, seconds - cal.overlap * compute * 2 / 3)
        elif name == "ring_p2p":
            terms[name] = max(0.0, seconds - terms["attention_compute"])
        else:
            terms[name] = seconds
    if layout.pp > 1:
        m = layout.grad_accum
        terms["pp_bubble"] = compute * (layout.pp - 1) / m
    b = 2 if layout.dtype == "bfloat16" else 4
    p = params_per_rank(shape, layout) / (layout.shard_group if layout.sharding in ("fsdp", "zero3") else 1)
    host_bytes = 0.0
    if layout.offload_params:
        host_bytes += p * b * (2 + (layout.recompute == "full")) * layout.grad_accum + 4 * p  # gathers + grads
    if layout.offload_optimizer or layout.offload_params:
        host_bytes += 4 * p * 2  # gradients down, updated weights up
        terms["host_optimizer"] = p / cal.host_adam_params_per_s
    copy_seconds = host_bytes / cal.host_bw
    if layout.offload_checkpoints or layout.offload_activations:
        from .memory_model import activation_terms

        _, offloaded = activation_terms(shape, layout, seq_len)
        # Activations always go to host memory; checkpoints to the tier.
        bw = cal.host_bw if layout.offload_activations else tier_bandwidth(layout, cal)
        copy_seconds += 2 * offloaded * layout.grad_accum / bw
    if copy_seconds:
        # Copies overlap compute on GPU (separate streams) only partly: count half.
        terms["host_transfers"] = 0.5 * copy_seconds
    kv_seconds = chunked_kv_traffic(shape, layout, seq_len) / tier_bandwidth(layout, cal)
    if kv_seconds:
        # Moved by a background thread, one chunk ahead, while the layers compute, but over the link the other
        # copies use: like them half counted, or all that exceeds the compute when the tier is the slower.
        terms["sequence_chunk_kv"] = max(0.5 * kv_seconds, kv_seconds - compute)
    total = sum(terms.values())
    tokens = layout.dp * layout.micro_batch * layout.grad_accum * seq_len
    return StepEstimate(total, tokens, terms)


# -- calibration probes ---------------------------------------------------------------------------------


def measure_matmul_flops(size: int = 1024, seconds: float = 1.0, dtype: str = "float32",
                         device: str = "cpu") -> float:
    """Achieved FLOP/s of square matmuls (2·n³ FLOPs each)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(size, size, dtype=dt, device=device)
    b = torch.randn(size, size, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


def measure_attention_flops(seq_len: int = 2048, heads: int = 4, head_dim: int = 32, seconds: float = 1.0,
                            dtype: str = "float32", device: str = "cpu") -> float:
    """Achieved FLOP/s of causal sdpa forward + backward (counted as 3 × 2·L²·heads·head_dim)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, dtype=dt, device=device, requires_grad=True)
               for _ in range(3))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    once()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        once()
        count += 1
    sync()
    flops = 3 * 2 * seq_len**2 * heads * head_dim  # causal half of 4·L²·q_width, forward + 2 × backward
    return flops * count / (time.perf_counter() - start)


def _collective_worker(rank: int, world: int, port: int, nbytes: int, repeats: int, out_dir: str,
                       backend: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=world)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    results = {}
    for name, op in (("all_reduce", lambda: dist.all_reduce(x)), ("all_to_all", lambda: dist.all_to_all_single(y, x))):
        op()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            op()
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.barrier()
        elapsed = (time.perf_counter() - start) / repeats
        # Bytes each rank sends: all-reduce (ring) 2·(n-1)/n·size, all-to-all (n-1)/n·size.
        factor = 2 * (world - 1) / world if name == "all_reduce" else (world - 1) / world
        results[name] = factor * nbytes / elapsed
    small = torch.ones(1, device=device)
    start = time.perf_counter()
    for _ in range(50):
        dist.all_reduce(small)
    results["latency_s"] = (time.perf_counter() - start) / 50
    if rank == 0:
        Path(out_dir, "collectives.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def measure_collectives(world: int = 2, nbytes: int = 16 * 2**20, repeats: int = 5,
                        backend: str = "gloo") -> dict[str, float]:
    """Bus bandwidth (bytes sent per rank per second) of all-reduce and all-to-all, and a small
    all-reduce's latency, between `world` local processes."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_collective_worker, args=(world, port, nbytes, repeats, tmp, backend), nprocs=world, join=True)
        return json.loads(Path(tmp, "collectives.json").read_text())


def calibrate(device: str = "cpu", world: int = 2) -> Calibration:
    """Measure this machine's constants: one rank's matmul and attention FLOP/s, and the collectives
    between `world` local processes (gloo on CPU, NCCL on GPU: the intra-node figure). The inter-node
    bandwidth cannot be measured from one node: it keeps the default unless the file is edited."""
    cuda = device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"
    base = Calibration.gpu_default() if cuda else Calibration.cpu_default()
    matmul = measure_matmul_flops(size=8192 if cuda else 1024, dtype=dtype, device=device)
    heads, head_dim = (32, 128) if cuda else (4, 32)
    lengths = (2048, 8192, 32768) if cuda else (1024, 2048, 4096, 8192)
    by_length = {str(n): measure_attention_flops(seq_len=n, heads=heads, head_dim=head_dim, dtype=dtype,
                                                 device=device) for n in lengths}
    attention = by_length[str(lengths[1])]  # the single figure, for calibration files without the table
    coll = measure_collectives(world, nbytes=(256 if cuda else 16) * 2**20, backend="nccl" if cuda else "gloo")
    intra = min(coll["all_reduce"], coll["all_to_all"])
    return Calibration(matmul_flops=matmul, attention_flops=attention, attention_flops_by_length=by_length,
                       intra_bw=intra,
                       inter_bw=base.inter_bw if cuda else intra, latency_s=coll["latency_s"],
                       host_bw=base.host_bw, host_adam_params_per_s=base.host_adam_params_per_s,
                       overlap=base.overlap, gpus_per_node=base.gpus_per_node if cuda else world,
                       source=f"measured by longtune plan --calibrate on {device}",
                       notes={"all_reduce_bw": coll["all_reduce"], "all_to_all_bw": coll["all_to_all"],
                              "world": world})
