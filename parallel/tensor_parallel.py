"""Tensor parallelism with DTensor: a plan of torch `ParallelStyle`s per model family, applied to the
decoder layers with `parallelize_module` over the `tp` dimension of the device mesh.

q/k/v and gate/up are split by output features (whole heads, MLP columns), o and down by input
features, so each rank computes its own heads and MLP slice and one collective per block joins
them. HF attention reshapes with `-1` heads (`view(*shape, -1, head_dim)`), so the local
projections run through the model's own code unchanged; attention sees `H / tp` heads.

With `sequence_parallel` (Megatron-style sequence parallelism inside the tp group), the residual
stream and the RMSNorms between the blocks hold `1 / tp` of the sequence: the all-reduce after o/down
becomes a reduce-scatter and the all-gather moves to the block inputs — the same traffic, `tp` times
less activation memory outside attention and MLP. The embeddings stay replicated and their output is
split (no traffic); the last layer's output is gathered before the final norm, so the norm and lm_head
see every position.

lm_head is vocabulary-parallel (loss parallelism): each rank holds `V / tp` rows of its weight and computes
its slice of the logits, which stay sharded (a DTensor); the head is a `TiledLMHead` (tiling.py) that
computes the loop's loss on those shards (`train/loss.py` → loss_parallel.py: two all-reduces of one value
per token), in chunks with `memory.tiled_loss`, in one piece without. No rank holds length × vocabulary
logits; outside the loss context (evaluation, generation) the head gathers them whole. A model that ties
lm_head to the input embeddings keeps both replicated and computes full logits on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from .tiling import install_loss_head

LayerPlan = Callable[[bool], dict[str, ParallelStyle]]
"""`sequence_parallel` → {sub-module path inside one decoder layer: style}."""

_LAYER_PLANS: dict[str, LayerPlan] = {}


def register_layer_plan(*model_types: str) -> Callable[[LayerPlan], LayerPlan]:
    """Register the decoder-layer plan of the HF `config.model_type`s given."""
    def register(plan: LayerPlan) -> LayerPlan:
        for model_type in model_types:
            _LAYER_PLANS[model_type] = plan
        return plan
    return register


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_LAYER_PLANS))


@register_layer_plan("llama", "mistral", "qwen2")
def decoder_layer_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Llama-style block: pre-norm attention (q/k/v/o) and gated MLP (gate/up/down).

    Biases (Qwen2's q/k/v) are sharded with their weight rows by ColwiseParallel.
    """
    # Row-parallel outputs are summed over tp: all-reduced to a replicated tensor, or reduce-scattered
    # over the sequence dim when the residual stream is sequence-sharded.
    joined = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=joined, use_local_output=not sequence_parallel),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=joined, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            # The decoder layer calls self_attn(hidden_states=...) and mlp(hidden_states): gather the
            # sequence before each block.
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                            use_local_output=True),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
        })
    return plan


@register_layer_plan("qwen3")
def qwen3_layer_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Llama's plan plus q_norm / k_norm, RMSNorms over head_dim applied to `[B, S, H, D]` per head.

    With the heads split over tp the norm is local to each rank; SequenceParallel's contract —
    replicated weight, input sharded on one dim — fits with the sharded dim being the heads (2), and
    it makes the weight's gradient the sum over every rank's heads.
    """
    plan = decoder_layer_plan(sequence_parallel)
    plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def root_plan(sequence_parallel: bool, vocab_parallel: bool) -> dict[str, ParallelStyle]:
    """Outside the decoder layers: the sequence-parallel boundaries (embeddings stay replicated) and the
    vocabulary-parallel lm_head."""
    plan: dict[str, ParallelStyle] = {}
    if sequence_parallel:
        plan.update({
            # Every rank has the full embedding output; keeping its part of the sequence needs no traffic.
            "model.embed_tokens": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                      use_local_output=False),
            # The whole sequence before the final norm: the loss chunks of a tiled lm_head split the sequence,
            # and every tp rank computes the logits of the same positions (its slice of the vocabulary).
            "model.norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True),
        })
    if vocab_parallel:
        # Weight rows (vocabulary entries) split over tp; the logits stay sharded on the vocabulary dim.
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_tensor_parallel(model: nn.Module, layers: nn.Module, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool) -> None:
    """Shard `layers` (the model's decoder layers: a ModuleList, or a pipeline stage's ModuleDict) in place
    over the 1-D `tp_mesh`."""
    model_type = model.config.model_type
    if model_type not in _LAYER_PLANS:
        raise ValueError(f"no tensor-parallel plan for model_type {model_type!r} "
                         f"(plans: {', '.join(supported_model_types())})")
    layer_plan = _LAYER_PLANS[model_type](sequence_parallel)
    for layer in layers.children():
        parallelize_module(layer, tp_mesh, layer_plan)
    # A pipeline stage holds the embeddings, the final norm and lm_head only where its slice has them.
    vocab_parallel = not getattr(model.config, "tie_word_embeddings", False)
    boundaries = {path: style for path, style in root_plan(sequence_parallel, vocab_parallel).items()
                  if _holds(model, path)}
    if boundaries:
        parallelize_module(model, tp_mesh, boundaries)
    if "lm_head" in boundaries:
        install_loss_head(model, None, f"parallel.tp {tp_mesh.size()}")


def _holds(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
