"""The rules a parallel layout must meet against a model's config: each returns why it cannot run (naming the
numbers), or None. Free of torch imports at module level, so that the launcher can check a recipe before it
starts any worker without paying for the modules that apply the layout (DTensor, pipelining)."""

from __future__ import annotations


def attention_heads(config) -> tuple[int, int]:
    """(query heads, KV heads) of an HF config; a config without `num_key_value_heads` has one per query head."""
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def tensor_parallel_problem(config, tp: int) -> str | None:
    """Why `tp` cannot split this model (naming the numbers), or None when it can."""
    if tp == 1:
        return None
    # The plans register with the module that applies them (DTensor styles); only tp > 1 needs it.
    from .tensor_parallel import supported_model_types

    if config.model_type not in supported_model_types():
        return (f"parallel.tp {tp}: no tensor-parallel plan for model_type {config.model_type!r} "
                f"(plans: {', '.join(supported_model_types())})")
    heads, kv_heads = attention_heads(config)
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
             "intermediate_size": config.intermediate_size}
    bad = [f"{name} {value}" for name, value in sizes.items() if value % tp]
    if bad:
        return f"parallel.tp {tp} does not divide the model's {', '.join(bad)}"
    return None


def ulysses_heads_problem(q_heads: int, kv_heads: int, ulysses: int, tp: int = 1) -> str | None:
    """Why Ulysses degree `ulysses` cannot split the heads each of the `tp` tensor-parallel ranks holds, or None.

    Ulysses splits the heads that tensor parallelism leaves on each rank; the KV heads are replicated the
    way the sequence-parallel attention does it (`kv_heads_problem`). Assumes `tensor_parallel_problem`
    passed (tp divides both head counts).
    """
    if ulysses == 1:
        return None
    if q_heads % (ulysses * tp):
        tp_text = f" / parallel.tp {tp} (= {q_heads // tp})" if tp > 1 else ""
        return f"parallel.sp.ulysses {ulysses} does not divide the model's {q_heads} query heads{tp_text}"
    problem = kv_heads_problem(q_heads // tp, kv_heads // tp, ulysses)
    if problem:
        return f"parallel.sp.ulysses {ulysses}: {problem} (parallel.sp.ring splits the sequence, not the heads)"
    return None


def kv_heads_problem(q_heads: int, kv_heads: int, ulysses: int) -> str | None:
    """Why the sequence-parallel attention cannot spread these heads over Ulysses degree `ulysses`, or None:
    `replicate_kv_heads`' own refusal (the query heads must divide, the KV heads must replicate evenly)."""
    if ulysses == 1:
        return None
    from .ulysses import replicate_kv_heads

    try:
        replicate_kv_heads(kv_heads, q_heads, ulysses)
    except ValueError as exc:
        return str(exc)
    return None


def pipeline_problem(config, pp: int, stages_per_rank: int, schedule: str, micro_batches: int) -> str | None:
    """Why this model and step cannot be pipelined as asked (naming the numbers), or None."""
    if pp == 1:
        return None
    stages = pp * stages_per_rank
    layers = config.num_hidden_layers
    if stages > layers:
        per_rank = f" × {stages_per_rank} stages per rank (= {stages} stages)" if stages_per_rank > 1 else ""
        return (f"parallel.pp {pp}{per_rank} exceeds the model's {layers} decoder layers "
                "(num_hidden_layers): every stage needs at least one")
    if getattr(config, "tie_word_embeddings", False):
        return (f"parallel.pp {pp}: the model ties lm_head to the input embeddings (tie_word_embeddings), "
                "which sit on the first and the last pipeline stage")
    if schedule == "1f1b" and micro_batches < pp:
        return (f"parallel.pp_schedule 1f1b needs at least pp (= {pp}) micro-batches per step, got "
                f"{micro_batches} (train.global_batch_size / (dp × train.micro_batch_size)); use gpipe or "
                "a smaller train.micro_batch_size")
    if schedule == "interleaved_1f1b":
        rounds = max(1, micro_batches // pp)
        if micro_batches % rounds:
            return (f"parallel.pp_schedule interleaved_1f1b runs micro-batches in rounds of pp (= {pp}): "
                    f"{micro_batches} micro-batches per step is not a multiple of {rounds} rounds")
    return None


def pose_problem(seq_len: int, target_length: int, pp: int) -> str | None:
    """Why PoSE cannot simulate `target_length` with rows of `seq_len` on `pp` pipeline ranks, or None. The
    target is the extension's (a recipe may give only extension.factor: the model config fixes it)."""
    if seq_len >= target_length:
        return (f"extension.pose: train.seq_len {seq_len} already covers the target length {target_length}; PoSE "
                "is for rows shorter than the target")
    if pp > 1:
        return "extension.pose with parallel.pp > 1: not available yet in this version of longtune"
    return None


def sequence_chunks_problem(chunks: int, recompute: str, recompute_modules, *, ring: int, ring_layout: str,
                            tp: int, pp: int, zero_stage: int) -> str | None:
    """Why `memory.sequence_chunks` cannot run with these settings, or None. The chunked layer is each layer's
    recomputation, so it replaces whole-layer recomputation; its chunks are cut from each rank's shard, which
    works under Ulysses and a ring of contiguous blocks but not with tensor or pipeline parallelism, and ZeRO-3's
    partitioned parameters do not reach its custom backward."""
    if chunks == 1:
        return None
    if recompute != "full" or recompute_modules:
        return (f"memory.sequence_chunks {chunks} recomputes each decoder layer chunk by chunk in backward: set "
                "memory.recompute=full (without memory.recompute_modules)")
    if ring > 1 and ring_layout != "contiguous":
        return ("memory.sequence_chunks with a ring cuts each chunk into contiguous ring blocks (each chunk "
                "balances the causal work itself): set parallel.sp.ring_impl=ring")
    refused = {"parallel.tp > 1": tp > 1, "parallel.pp > 1": pp > 1,
               "parallel.deepspeed.zero_stage 3": zero_stage == 3}
    missing = [k for k, on in refused.items() if on]
    if missing:
        return (f"memory.sequence_chunks does not combine with {', '.join(missing)} (Ulysses, a ring, FSDP2, DDP "
                "and ZeRO-1/2 do)")
    return None
