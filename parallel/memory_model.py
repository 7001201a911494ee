"""Memory model: bytes per rank of one training layout, term by term, as pure functions.

Every term is derived from what longtune's code keeps alive (HF decoder layers of the llama family,
`parallelize()`'s wrappers, the loop's loss) and is named so that a table can show it. The activation
terms were checked tensor by tensor against autograd's saved tensors (`saved_tensors_hooks`, fp32, tiny
Llama): see docs/planner.md. Device bytes and host bytes are kept apart; on a CPU run both are the same
process memory (`host_is_device=True`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .layout import Layout

GIB = 2**30

@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF decoder config the memory and time models need."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden / heads
    tied_embeddings: bool = False
    name: str = "model"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads are not a multiple of {self.kv_heads} KV heads")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | Any, name: str = "model") -> ModelShape:
        """From a config.json dict or a transformers config object."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, intermediate=get("intermediate_size"),
                   vocab=get("vocab_size"), head_dim=get("head_dim") or 0,
                   tied_embeddings=bool(get("tie_word_embeddings", False)), name=name)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections, gate/up/down MLP, two RMSNorm weights (no biases)."""
        h = self.hidden
        return h * self.q_width * 2 + h * self.kv_width * 2 + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """lm_head (0 when tied to the embeddings) and the final norm."""
        return (0 if self.tied_embeddings else self.vocab * self.hidden) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params


@dataclass
class MemoryBreakdown:
    """Per-rank bytes: `device`, `host` and `disk` map term names to bytes; `peak_*` are what must fit."""

    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)
    """The disk offload tier (memory.offload.tier=disk): neither device nor host memory."""
    transient: dict[str, float] = field(default_factory=dict)
    """Working sets that exist one at a time; the peak adds only the largest."""

    @property
    def peak_device(self) -> float:
        return sum(self.device.values()) + max(self.transient.values(), default=0.0)

    @property
    def peak_host(self) -> float:
        return sum(self.host.values())

    @property
    def peak_disk(self) -> float:
        return sum(self.disk.values())

    def table(self) -> list[tuple[str, str, float]]:
        rows = [(name, "device", b) for name, b in self.device.items()]
        rows += [(name, "transient", b) for name, b in self.transient.items()]
        rows += [(name, "host", b) for name, b in self.host.items()]
        rows += [(name, "disk", b) for name, b in self.disk.items()]
        return rows


# -- parameters, gradients, optimizer ---------------------------------------------------------------


def params_per_rank(shape: ModelShape, layout: Layout) -> float:
    """Parameters one rank holds before ZeRO/FSDP sharding: its pipeline stage's layers (split as evenly
    as possible, the first stages take the remainder) with tp-sharded layer weights; embeddings and
    lm_head are replicated over tp (longtune has no vocabulary-parallel lm_head). The worst stage counts:
    pp 1 holds everything, else the first stage (embeddings) or the last (lm_head), whichever is larger."""
    layers = math.ceil(shape.layers / layout.pp) * shape.layer_params / layout.tp
    if layout.pp == 1:
        return layers + shape.embedding_params + shape.head_params
    return layers + max(shape.embedding_params, shape.head_params)


def _sharded(layout: Layout, what: str) -> bool:
    """Whether `what` (params | grads | optimizer) is partitioned over dp × sp in this layout."""
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[layout.sharding]
    return stage >= {"optimizer": 1, "grads": 2, "params": 3}[what]


def weights_bytes(shape: ModelShape, layout: Layout) -> float:
    """fp32 weights (longtune builds the model in fp32; bfloat16 is mixed precision with fp32 masters).
    Under ZeRO-3 / FSDP each rank keeps 1 / (dp × sp) of them."""
    p = params_per_rank(shape, layout)
    return 4 * p / (layout.shard_group if _sharded(layout, "params") else 1)


def gradients_bytes(shape: ModelShape, layout: Layout) -> float:
    """fp32 gradients of the fp32 parameters; sharded from ZeRO-2 / FSDP on."""
    p = params_per_rank(shape, layout)
    return 4 * p / (layout.shard_group if _sharded(layout, "grads") else 1)


def optimizer_bytes(shape: ModelShape, layout: Layout) -> float:
    """AdamW: exp_avg and exp_avg_sq in fp32 (8 bytes per parameter); sharded from ZeRO-1 / FSDP on. The
    master weights are the fp32 parameters themselves (`weights_bytes`)."""
    p = params_per_rank(shape, layout)
    return 8 * p / (layout.shard_group if _sharded(layout, "optimizer") else 1)


def top_of_backward_gradient_bytes(shape: ModelShape, layout: Layout) -> float | None:
    """Unsharded gradients appear as backward reaches their parameters: while the activations peak (the
    loss and the top layers' backward) only lm_head's, the final norm's and one layer's exist; all of them
    only at the optimizer step. None where gradients are a standing term instead: sharded (ZeRO-2+ / FSDP,
    reduce-scattered as they come), on the host (parameter offload), or pipelined (a stage accumulates
    its gradients over all micro-batches while their activations are alive), or under DDP (they are views into
    its all-reduce buckets, allocated when the model is wrapped)."""
    if _sharded(layout, "grads") or layout.offload_params or layout.pp > 1 or _ddp_replicated(layout):
        return None
    return 4 * (shape.head_params + shape.layer_params / layout.tp)


def optimizer_step_temporaries(shape: ModelShape, layout: Layout, host_is_device: bool) -> float:
    """AdamW's scratch during the step: on CPU torch runs it tensor by tensor (two fp32 temporaries of the
    largest parameter, the embedding or lm_head matrix); on GPU its multi-tensor (foreach) path makes one fp32 temporary
    per parameter."""
    if host_is_device:
        return 2 * 4 * shape.vocab * shape.hidden
    return 4 * params_per_rank(shape, layout)


def _ddp_replicated(layout: Layout) -> bool:
    """DDP wraps the model (dp × sp > 1 without sharding): longtune passes gradient_as_bucket_view=True, so
    the gradients are views into DDP's all-reduce buckets, one fp32 copy allocated at wrapping, standing from
    then on (without it DDP would hold a second copy)."""
    return layout.sharding == "ddp" and layout.shard_group > 1


def unsharded_layer_bytes(shape: ModelShape, layout: Layout) -> float:
    """ZeRO-3 / FSDP gather one decoder layer's weights for its forward and backward (2 in flight with
    prefetch) in the compute dtype, and its full gradient before the reduce-scatter (fp32)."""
    if not _sharded(layout, "params"):
        return 0.0
    b = 2 if layout.dtype == "bfloat16" else 4
    return shape.layer_params / layout.tp * (2 * b + 4)


def autocast_weight_bytes(shape: ModelShape, layout: Layout) -> float:
    """bfloat16 without sharding: autocast keeps a bf16 copy of every weight it casts during the
    forward (its cache lives until the forward ends; backward reuses the saved copies)."""
    if layout.dtype != "bfloat16" or _sharded(layout, "params"):
        return 0.0
    return 2 * params_per_rank(shape, layout)


# -- activations ------------------------------------------------------------------------------------


def tokens_per_rank(seq_len: int, layout: Layout) -> float:
    """Sequence positions one rank processes per micro-batch (sp splits the sequence)."""
    return layout.micro_batch * seq_len / layout.sp


def _act_bytes(layout: Layout) -> int:
    return 2 if layout.dtype == "bfloat16" else 4


def attention_kv_width(shape: ModelShape, layout: Layout) -> int:
    """Width of k (or v) per token in an O(L) kernel: GQA's KV heads, replicated to lcm(KV heads, ulysses)
    under Ulysses (the all-to-all gives each rank ulysses × the tokens and 1 / ulysses of those heads)."""
    u = layout.sp_ulysses
    return math.lcm(shape.kv_heads, u) * shape.head_dim if u > 1 else shape.kv_width


def attention_saved_per_token(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Bytes one layer's attention saves per local token.

    q and the kernel output (q_width each) and k, v: GQA-size for an O(L) kernel (under Ulysses the KV
    heads are replicated to lcm(kv heads, ulysses)), repeated to the query heads by transformers' sdpa
    path with a mask, which also saves a float copy of the mask: 4·L bytes per token and layer (the
    O(L²) term). Plus the fp32 log-sum-exp (one per head). Ulysses adds the output of the inverse
    all-to-all, which o_proj saves (the kernel's own output is then a separate tensor).
    """
    b = _act_bytes(layout)
    if layout.attention == "sdpa_masked":
        kv = shape.q_width
        mask = 4 * seq_len * layout.micro_batch / layout.sp  # per local token: a row of the L × L mask
    else:
        kv = attention_kv_width(shape, layout)
        mask = 0.0
    per_token = b * (2 * shape.q_width + 2 * kv) / layout.tp + 4 * shape.heads / layout.tp + mask
    if layout.sp_ulysses > 1:
        per_token += b * shape.hidden / layout.tp
    return per_token


def mlp_saved_per_token(shape: ModelShape, layout: Layout) -> float:
    """gate output (silu's input), silu output, up output, their product (down_proj's input): 4 × I."""
    return _act_bytes(layout) * 4 * shape.intermediate / layout.tp


def norm_saved_per_token(shape: ModelShape, layout: Layout) -> float:
    """The residual stream around one layer and its two RMSNorms, plus two fp32 rsqrt values.

    fp32: the layer input, x·rsqrt(var) and the scaled output of each norm, the attention residual sum:
    6 × hidden × 4 bytes. bfloat16 (mixed precision): HF's RMSNorm computes in fp32 and the residual stream
    stays fp32 (4 fp32 tensors), and 5 bf16 ones (the projections' cast inputs and the attention output
    reshaped for o_proj): 26 bytes × hidden (measured under CPU autocast; FSDP2's bf16 parameters give
    about 28). With tp sequence parallelism these are split over tp (assumed on when tp > 1)."""
    per_hidden = 26 if layout.dtype == "bfloat16" else 24
    return (per_hidden * shape.hidden + 2 * 4) / layout.tp


def layer_saved_per_token(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Bytes one decoder layer saves for backward per local token without recomputation (tiled MLP:
    the MLP's intermediates are recomputed per chunk, only its input — already counted — is kept)."""
    mlp = 0.0 if layout.tiled_mlp_chunk else mlp_saved_per_token(shape, layout)
    return norm_saved_per_token(shape, layout) + attention_saved_per_token(shape, layout, seq_len) + mlp


def checkpoint_input_per_token(shape: ModelShape, layout: Layout) -> float:
    """A recomputed layer keeps its input hidden states only."""
    return _act_bytes(layout) * shape.hidden / layout.tp


# -- sequence-chunked layers ------------------------------------------------------------------------

KV_GRAD_BYTES = 4
"""dK/dV accumulators of a chunked layer's backward are summed over the later chunks: fp32."""


def chunked(layout: Layout) -> bool:
    """Each decoder layer runs on `sequence_chunks` consecutive chunks of the local sequence: forward
    without autograd, saving only the layer's input; backward recomputes chunk by chunk in reverse, with
    autograd. So a chunked layer is a fully recomputed one whose working set is one chunk's."""
    return layout.sequence_chunks > 1


def one_chunk(layout: Layout) -> Layout:
    """What one chunk of a chunked layer is to the unchunked terms (called with length / chunks): a fully
    recomputed layer whose input is a view of the whole layer's input (so not counted again), attention
    through longtune's O(L) block kernel."""
    return replace(layout, sequence_chunks=1, recompute="full", recompute_modules=(), offload_checkpoints=False,
                   offload_activations=False, attention="flash")


def kv_per_token(shape: ModelShape, layout: Layout) -> float:
    """Bytes of one layer's K and V (after RoPE) per local token, as a chunked layer puts them in the tier."""
    return 2 * attention_kv_width(shape, layout) * _act_bytes(layout) / layout.tp


def chunked_kv_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Every chunk's K and V of every layer: written to the offload tier in forward, kept there until that
    layer's backward, so at the end of the forward all layers' are there. With a ring each rank keeps the
    ring's blocks of every chunk (all-gathered in forward): sp_ring × its own."""
    layers = math.ceil(shape.layers / layout.pp) * layout.pp
    return layers * tokens_per_rank(seq_len, layout) * layout.sp_ring * kv_per_token(shape, layout)


def chunked_kv_grad_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """The running layer's dK/dV accumulators for all its blocks (fp32; with a ring, the ring's), in the tier
    during its backward."""
    return (tokens_per_rank(seq_len, layout) * layout.sp_ring * kv_per_token(shape, layout) * KV_GRAD_BYTES
            / _act_bytes(layout))


def residual_stream_bytes(layout: Layout) -> int:
    """Bytes per element of the hidden states between layers: fp32 under autocast (fp32 weights: bf16
    without FSDP2 on the native backend) and in fp32 runs; bf16 where the backend casts the parameters
    (FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16 model)."""
    return 2 if layout.dtype == "bfloat16" and layout.sharding != "ddp" else 4


def chunked_layer_backward_phases(shape: ModelShape, layout: Layout, seq_len: int, *,
                                  host_is_device: bool = False) -> dict[str, float]:
    """One chunked layer's backward, per phase: the phases of one chunk's recomputed backward (c tokens),
    plus what spans the whole local sequence — the gradient arriving at the layer's output and the one it
    returns for its input, and the layer's input itself when it comes back from the tier to a separate
    device — plus what chunk i's attention backward holds for an earlier chunk j: two chunks' K/V (j and
    the prefetched j + 1) and three fp32 tensors of their size (j's block gradients, its accumulator read
    back, their sum), with a ring the all-to-all's fp32 dK/dV of the ring's blocks of the chunk (sent and
    received), and the chunk's parameter gradients before they join the layer's sum."""
    chunk_len = seq_len / layout.sequence_chunks
    phases = layer_backward_phases(shape, one_chunk(layout), chunk_len)
    stream = residual_stream_bytes(layout) * shape.hidden / layout.tp * tokens_per_rank(seq_len, layout)
    back = layout.offload_checkpoints and not (host_is_device and layout.offload_tier == "host")
    whole = (3 if back else 2) * stream
    kv_chunk = tokens_per_rank(chunk_len, layout) * kv_per_token(shape, layout)
    ring = 2 * layout.sp_ring if layout.sp_ring > 1 else 0
    blocks = kv_chunk * (2 + (3 + ring) * KV_GRAD_BYTES / _act_bytes(layout))
    param_grads = shape.layer_params / layout.tp * (_act_bytes(layout) if _sharded(layout, "params") else 4)
    return {name: value + whole + blocks + param_grads for name, value in phases.items()}


def activation_terms(shape: ModelShape, layout: Layout, seq_len: int) -> tuple[float, float]:
    """(device bytes, host bytes) of the saved activations of one rank's layers.

    A 1F1B pipeline's first stage holds pp micro-batches in flight, each through its 1/pp of the layers:
    about the same total as all layers of one micro-batch. Recomputed layers keep their input only
    (in host memory with offload.checkpoints), and so do sequence-chunked ones, whatever `recompute` says;
    selective sub-modules keep their input, which the norm terms already count; offload.activations moves
    everything saved to host memory.
    """
    tokens = tokens_per_rank(seq_len, layout)
    layers = math.ceil(shape.layers / layout.pp) * layout.pp
    per_plain = layer_saved_per_token(shape, layout, seq_len)
    checkpointed = 0
    if layout.recompute == "full" or chunked(layout):
        checkpointed = layers
    elif layout.recompute == "selective" and not layout.recompute_modules:
        checkpointed = math.ceil(layers / layout.recompute_every)
    elif layout.recompute == "selective":
        if "mlp" in layout.recompute_modules and not layout.tiled_mlp_chunk:
            per_plain -= mlp_saved_per_token(shape, layout)
        if "self_attn" in layout.recompute_modules:
            per_plain -= attention_saved_per_token(shape, layout, seq_len)
    kept = checkpointed * checkpoint_input_per_token(shape, layout) * tokens
    plain = (layers - checkpointed) * per_plain * tokens
    if layout.offload_activations:
        return 0.0, kept + plain
    if layout.offload_checkpoints:
        return plain, kept
    return plain + kept, 0.0


def model_level_saved_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Outside the layers: the final norm's saved tensors (`final_norm_saved_bytes`), RoPE cos/sin, ids and
    labels."""
    tokens = tokens_per_rank(seq_len, layout)
    b = _act_bytes(layout)
    return final_norm_saved_bytes(shape, layout, seq_len) + tokens * (4 + 2 * b * shape.head_dim + 3 * 8)


def final_norm_saved_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """The final norm's saved tensors (input, x·rsqrt, lm_head's input: 3 fp32, or 2 fp32 and a bf16 cast under
    mixed precision); with a tiled loss and no tensor parallelism the norm runs in the loss chunks
    (tiling.DeferredNorm) and only its input, the last layer's output, is kept. Its backward runs, and frees
    them, before the layers' backward."""
    if layout.tiled_loss_chunk and layout.tp == 1:
        per_token = residual_stream_bytes(layout) * shape.hidden
    else:
        per_token = (10 if layout.dtype == "bfloat16" else 12) * shape.hidden
    return tokens_per_rank(seq_len, layout) * per_token


def mask_bytes(layout: Layout, seq_len: int) -> float:
    """The boolean L × L packed-document mask transformers builds for sdpa (once per forward)."""
    if layout.attention != "sdpa_masked":
        return 0.0
    local = seq_len / layout.sp
    return layout.micro_batch * local * local


def logits_loss_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Logits and cross-entropy at the start of backward: the logits (kept by the loop's output), the
    fp32 log-softmax saved by cross-entropy, its gradient and the logits' gradient: 4 × tokens × vocab in
    fp32 (bf16 logits add a bf16 copy). Tiled loss: the same for one chunk of positions (recomputed in
    backward), the full logits never exist. Under tensor parallelism each rank holds its `vocab / tp` slice
    (vocabulary-parallel lm_head and loss; a model with tied embeddings keeps the full vocabulary), and the
    vocabulary-parallel cross-entropy (loss_parallel.py) keeps two fp32 copies, not four: the logits and the
    softmax, whose buffer becomes the logits' gradient."""
    tokens = tokens_per_rank(seq_len, layout)
    if layout.tiled_loss_chunk:
        tokens = min(tokens, layout.micro_batch * layout.tiled_loss_chunk)
    extra = 2 if layout.dtype == "bfloat16" else 0
    vocab = _vocab_per_rank(shape, layout)
    copies = 2 if vocab < shape.vocab else 4
    return tokens * vocab * (copies * 4 + extra)


def kept_logits_bytes(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """The loop holds the model output (the logits, untiled) until the next micro-batch: they are still
    alive while the layers run backward. Tiled loss, and the vocabulary-parallel lm_head, return a scalar
    instead."""
    if layout.tiled_loss_chunk or _vocab_per_rank(shape, layout) < shape.vocab:
        return 0.0
    return tokens_per_rank(seq_len, layout) * shape.vocab * (2 if layout.dtype == "bfloat16" else 4)


def _vocab_per_rank(shape: ModelShape, layout: Layout) -> float:
    """The logits' vocabulary on one rank: tensor parallelism splits lm_head's rows unless they are tied to the
    input embeddings (parallel/tensor_parallel.py)."""
    return shape.vocab if shape.tied_embeddings else shape.vocab / layout.tp


def _phase_gradients(shape: ModelShape, layout: Layout, seq_len: int) -> tuple[float, float]:
    """(MLP phase, attention phase) gradient bytes of one layer's backward.

    MLP phase: the gradients of the MLP's intermediates (one chunk when tiled) plus the residual stream's
    gradient and the gradient into the post-attention norm. Attention phase: dq, dk, dv and dout plus the
    residual gradient (the MLP's gradients are gone by then)."""
    tokens = tokens_per_rank(seq_len, layout)
    b = _act_bytes(layout)
    mlp_tokens = min(tokens, layout.micro_batch * layout.tiled_mlp_chunk) if layout.tiled_mlp_chunk else tokens
    mlp = 3 * shape.intermediate / layout.tp * b * mlp_tokens + 2 * shape.hidden * b * tokens
    attention = (4 * shape.q_width / layout.tp + shape.hidden) * b * tokens
    return mlp, attention


def _layer_recomputed(layout: Layout) -> bool:
    return layout.recompute == "full" or (layout.recompute == "selective" and not layout.recompute_modules)


def recompute_working_set(shape: ModelShape, layout: Layout, seq_len: int, *, host_is_device: bool = False) -> float:
    """A recomputed layer's activations exist again during its backward (one layer at a time), except its
    input: that is the checkpoint itself (counted with the activations) unless an offloaded checkpoint is
    brought back to a separate device (or, on CPU, from disk); a tiled MLP recomputes one chunk's intermediates.
    A sequence-chunked layer recomputes one chunk at a time."""
    if chunked(layout):
        return recompute_working_set(shape, one_chunk(layout), seq_len / layout.sequence_chunks)
    tokens = tokens_per_rank(seq_len, layout)
    if _layer_recomputed(layout):
        again = layer_saved_per_token(shape, layout, seq_len)
        if not layout.offload_checkpoints or (host_is_device and layout.offload_tier == "host"):
            again -= checkpoint_input_per_token(shape, layout)
        # full with nested norm checkpoints: each keeps its input only, not its fp32 x·rsqrt (the other nested
        # sub-modules are not modelled)
        again -= sum(name.endswith("norm") for name in layout.recompute_modules) * 4 * shape.hidden / layout.tp
        return again * tokens
    if layout.tiled_mlp_chunk:
        return mlp_saved_per_token(shape, layout) * min(tokens, layout.micro_batch * layout.tiled_mlp_chunk)
    return 0.0


def layer_backward_phases(shape: ModelShape, layout: Layout, seq_len: int, *,
                          host_is_device: bool = False) -> dict[str, float]:
    """Bytes on top of the standing terms while one layer runs backward, per phase; the peak is the larger.

    - `mlp`: the recomputed layer's activations (all of them: backward starts at the MLP) and the MLP
      phase's gradients.
    - `attention`: the MLP's and the post-attention norm's saved tensors are freed by then (recomputed
      layers: both are part of the recomputed set); the attention gradients, or at the all-to-all / ring
      exchange moments the sequence-parallel buffers, whichever is larger, with the residual gradient.
    Measured (docs/memory.md, a sampler labelled by the running module): under recompute + tiled MLP the
    peak is in the MLP phase, one process and Ulysses alike; the Ulysses buffers do not add to it.
    Sequence-chunked layers: `chunked_layer_backward_phases`."""
    if chunked(layout):
        return chunked_layer_backward_phases(shape, layout, seq_len, host_is_device=host_is_device)
    mlp_grads, attention_grads = _phase_gradients(shape, layout, seq_len)
    again = recompute_working_set(shape, layout, seq_len, host_is_device=host_is_device)
    freed = 0.0
    if _layer_recomputed(layout):
        tokens = tokens_per_rank(seq_len, layout)
        freed = tokens * (norm_saved_per_token(shape, layout) / 2
                          + (0.0 if layout.tiled_mlp_chunk else mlp_saved_per_token(shape, layout)))
    elif layout.tiled_mlp_chunk:
        freed = again  # the chunk's recomputed intermediates are gone after the MLP
    residual = _act_bytes(layout) * shape.hidden * tokens_per_rank(seq_len, layout)
    exchange = sequence_parallel_buffers(shape, layout, seq_len) + residual
    return {"mlp": again + mlp_grads, "attention": again - freed + max(attention_grads, exchange)}


def sequence_parallel_buffers(shape: ModelShape, layout: Layout, seq_len: int) -> float:
    """Ulysses: the send and receive buffers of the q/k/v all-to-all (a contiguous input copy and the
    output, both of q + 2 kv width per local token). Ring: the K/V block being received while the current
    one is used, and in backward the travelling dK/dV (2 + 2 blocks of k + v)."""
    tokens = tokens_per_rank(seq_len, layout)
    b = _act_bytes(layout)
    total = 0.0
    if layout.sp_ulysses > 1:
        kv = attention_kv_width(shape, layout)
        total += 2 * b * tokens * (shape.q_width + 2 * kv) / layout.tp
    if layout.sp_ring > 1:
        total += 4 * b * tokens * 2 * shape.kv_width / layout.tp
    return total


def memory_breakdown(shape: ModelShape, layout: Layout, seq_len: int, *, baseline_bytes: float = 0.0,
                     host_is_device: bool = False) -> MemoryBreakdown:
    """Every term for one rank. `baseline_bytes`: the process before the model (on GPU: the CUDA context
    and NCCL buffers outside the allocator; on CPU: python, torch, tokenizer and corpus — measured).
    `host_is_device`: a CPU run, where tensors offloaded to host memory stay in the same process memory
    (the disk tier takes them out of it)."""
    out = MemoryBreakdown()
    dev, host = out.device, out.host
    tier = out.disk if layout.offload_tier == "disk" else host
    weights = weights_bytes(shape, layout)
    grads = gradients_bytes(shape, layout)
    opt = optimizer_bytes(shape, layout)
    # FSDP2's CPUOffloadPolicy / ZeRO offload move parameters (and with them gradients) or optimizer state.
    (host if layout.offload_params else dev)["weights"] = weights
    grads_top = top_of_backward_gradient_bytes(shape, layout)
    if grads_top is None:
        (host if layout.offload_params else dev)["gradients"] = grads
    leaves = not (host_is_device and layout.offload_tier == "host")  # the tier is out of this memory
    swapped_out = layout.optimizer_swap and leaves
    grads_out = layout.offload_gradients and leaves and grads_top is not None
    if grads_out:  # from their accumulation to the step (counted in the step's transient)
        tier["gradients (backward to step)"] = grads
    if layout.offload_optimizer or layout.offload_params:
        host["optimizer"] = opt
    elif swapped_out:  # back on the device for the step only (counted in the step's transient below)
        tier["optimizer (between steps)"] = opt
    else:
        dev["optimizer"] = opt
    dev["autocast_weights"] = autocast_weight_bytes(shape, layout)
    act_dev, act_host = activation_terms(shape, layout, seq_len)
    dev["activations"] = act_dev
    host["offloaded_activations"] = act_host if layout.offload_activations else 0.0
    tier["offloaded_checkpoints"] = 0.0 if layout.offload_activations else act_host
    if chunked(layout):
        tier["sequence_chunk_kv"] = chunked_kv_bytes(shape, layout, seq_len)
        tier["sequence_chunk_kv_grads"] = chunked_kv_grad_bytes(shape, layout, seq_len)
    dev["model_level_activations"] = model_level_saved_bytes(shape, layout, seq_len)
    dev["attention_mask"] = mask_bytes(layout, seq_len)
    dev["baseline"] = baseline_bytes
    out.transient["logits_loss"] = logits_loss_bytes(shape, layout, seq_len) + (grads_top or 0.0)
    # With gradient offload lm_head's gradient has left when the layers' backward begins: one layer's is there.
    grads_layers = 4 * shape.layer_params / layout.tp if grads_out else (grads_top or 0.0)
    out.transient["layer_backward"] = (kept_logits_bytes(shape, layout, seq_len)
                                       + grads_layers - final_norm_saved_bytes(shape, layout, seq_len)
                                       + max(layer_backward_phases(shape, layout, seq_len,
                                                                   host_is_device=host_is_device).values())
                                       + unsharded_layer_bytes(shape, layout))
    step_state = opt if swapped_out else 0.0
    # By the optimizer step the forward's saved tensors are gone: the step's working set replaces them.
    freed_by_step = act_dev + dev["model_level_activations"] + dev["attention_mask"]
    if grads_top is not None:
        # The last layer's backward: every layer's gradient exists by then, while the layers above have
        # freed their activations (the standing device share of them, one layer's left). With checkpoints
        # off the device (offloaded to disk, or from a GPU) nothing is freed and this is the peak.
        layers = math.ceil(shape.layers / layout.pp) * layout.pp
        on_host = layout.offload_activations or layout.offload_tier == "host"
        resident = act_dev + (act_host if host_is_device and on_host else 0.0)
        # With gradient offload only the running layer's gradients are there.
        standing = grads_layers if grads_out else grads
        out.transient["layer_backward (last layer)"] = (
            out.transient["layer_backward"] - grads_layers + standing - resident * (layers - 1) / layers)
        out.transient["optimizer_step"] = (grads + step_state - freed_by_step
                                           + optimizer_step_temporaries(shape, layout, host_is_device))
    elif _ddp_replicated(layout) or swapped_out:  # the gradients are standing (DDP's buckets)
        out.transient["optimizer_step"] = (step_state - freed_by_step
                                           + optimizer_step_temporaries(shape, layout, host_is_device))
    if host_is_device:
        for name, value in list(host.items()):
            dev[f"{name} (host)"] = value
        host.clear()
    out.device = {k: v for k, v in dev.items() if v}
    out.host = {k: v for k, v in host.items() if v}
    out.disk = {k: v for k, v in out.disk.items() if v}
    return out
