"""Progressive stages: one recipe, several runs of increasing length, each trained from the previous
stage's exported model, each resumable, each optionally gated by an evaluation before the next starts.

Every stage is an ordinary run (`Recipe.stage_recipe`) in `train.output_dir/<stage name>/`. A stage is
complete once its `stage.json` says so (written after training, export and a passed gate); a re-run skips
complete stages and lets the loop resume the first incomplete one from its newest checkpoint. Every stage's
extension is computed from the first stage's model (its rope and max_position_embeddings are put back
before the stage's own extension is applied), so a stage states its rope completely.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtune.data_prep.atomic_write import atomic_write
from longtune.data_prep.user_error import UserError
from longtune.parallel.dims import barrier, launched_world

from .model import build_config, resolve_model_source
from .recipe import Recipe, StageGateSection, recipe_from_dict

STAGE_FILE = "stage.json"
_RUN_CONTROL_KEYS = ("progress", "resume", "overwrite", "wandb")
"""train.* keys that do not change what a stage trains: a stage completed under other values still counts."""


class StageError(UserError, RuntimeError):
    """A stage that stops the run: a failed gate, or a completed stage whose recipe has changed."""


def _say(text: str) -> None:
    if launched_world()[0] == 0:
        print(f"longtune: {text}", file=sys.stderr, flush=True)


def base_rope(recipe: Recipe) -> dict[str, Any]:
    """The first stage's rope_parameters and max_position_embeddings (with the recipe's config_overrides)."""
    source = resolve_model_source(recipe.model.name_or_path)
    config = build_config(source, 8, recipe.model.config_overrides, recipe.model.trust_remote_code)
    return {"rope_parameters": dict(config.rope_parameters), "max_position_embeddings": config.max_position_embeddings}


def chained_recipe(stage: Recipe, previous_run: Path, rope: dict[str, Any]) -> Recipe:
    """`stage` trained from `previous_run`'s export. With an extension the base rope is put back first;
    without one the previous stage's rope is kept."""
    data = stage.model_dump(mode="json")
    data["model"]["name_or_path"] = str(previous_run / "model")
    overrides = dict(data["model"]["config_overrides"])
    if stage.extension.enabled:
        overrides.update(rope)
    else:
        for key in rope:
            overrides.pop(key, None)
    data["model"]["config_overrides"] = overrides
    return recipe_from_dict(data, source=f"stage {Path(stage.train.output_dir).name}")


def recipe_digest(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    for key in _RUN_CONTROL_KEYS:
        data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_stage_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stage_state(run_dir: Path, state: dict[str, Any]) -> None:
    with atomic_write(run_dir / STAGE_FILE) as handle:
        handle.write(json.dumps(state, indent=1))


def gate_length(gate: StageGateSection, stage: Recipe) -> int:
    return gate.length or stage.extension.target_length or stage.train.seq_len


def evaluate_gate(gate: StageGateSection, stage: Recipe, model_dir: Path) -> dict[str, Any]:
    """Run the gate's evaluations on the exported model (one process); `passed` says whether every one holds."""
    from .evaluate.common import load_model, long_text_documents
    from .evaluate.passkey import run_passkey
    from .evaluate.perplexity import run_perplexity

    length = gate_length(gate, stage)
    lm = load_model(model_dir)
    result: dict[str, Any] = {"length": length, "passed": True, "failures": []}
    if gate.perplexity_below is not None:
        point = run_perplexity(lm, [length], ["single_window"], long_text_documents(), gate.texts, 256)["points"][0]
        result["perplexity"] = point["ppl"]
        if not point["ppl"] < gate.perplexity_below:
            result["failures"].append(f"perplexity {point['ppl']:.4g} at {length} tokens (single window, "
                                      f"{gate.texts} embedded texts) is not below {gate.perplexity_below:g}")
    if gate.passkey_at_least is not None:
        cells = run_passkey(lm, [length], [0.0, 0.5, 1.0], gate.trials, stage.train.seed)["cells"]
        accuracy = sum(c["accuracy"] for c in cells) / len(cells)
        result["passkey_accuracy"] = accuracy
        if not accuracy >= gate.passkey_at_least:
            result["failures"].append(f"passkey accuracy {accuracy:.3f} at {length} tokens (depths 0, 0.5, 1; "
                                      f"{gate.trials} keys each) is below {gate.passkey_at_least:g}")
    result["passed"] = not result["failures"]
    return result


def _gate_on_rank0(gate: StageGateSection, stage: Recipe, model_dir: Path) -> dict[str, Any]:
    """Rank 0 evaluates (the others wait in the broadcast, within the process group's timeout); every rank
    gets its result."""
    gc.collect()  # the stage's training model is garbage by now: give its memory back before loading the export
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result = evaluate_gate(gate, stage, model_dir) if launched_world()[0] == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def run_stages(recipe: Recipe) -> Path:
    """Train every stage not yet complete, in order; returns the last stage's run dir."""
    from .loop import run_training

    rope = base_rope(recipe.stage_recipe(0))
    count = len(recipe.stages)
    previous: Path | None = None
    for index in range(count):
        name = recipe.stage_name(index)
        stage = recipe.stage_recipe(index)
        if previous is not None:
            stage = chained_recipe(stage, previous, rope)
        run_dir = Path(stage.train.output_dir)
        digest = recipe_digest(stage)
        where = f"stage {index + 1}/{count} ({name})"
        state = read_stage_state(run_dir)
        if state and state.get("status") == "complete" and (run_dir / "model" / "config.json").is_file():
            if state.get("recipe_digest") != digest:
                raise StageError(f"{where} was completed in {run_dir} with other settings than the recipe's now; "
                                 "use a new train.output_dir, or delete that stage dir (and the later ones) to "
                                 "train it again")
            _say(f"{where}: complete in {run_dir}, skipped")
            previous = run_dir
            continue
        _say(f"{where}: training from {stage.model.name_or_path} in {run_dir}")
        run_training(stage)
        gate = recipe.stages[index].gate
        result = _gate_on_rank0(gate, stage, run_dir / "model") if gate.enabled else None
        status = "complete" if result is None or result["passed"] else "gate_failed"
        if launched_world()[0] == 0:
            _write_stage_state(run_dir, {"stage": index, "name": name, "status": status, "gate": result,
                                         "recipe_digest": digest})
        barrier()
        if status != "complete":
            raise StageError(f"{where}: gate failed: {'; '.join(result['failures'])}. Its model is in "
                             f"{run_dir / 'model'}; raise the stage's train.max_steps (it resumes from its last "
                             "checkpoint) or change the gate, then run the recipe again")
        if result is not None:
            _say(f"{where}: gate passed ({_gate_summary(result)})")
        previous = run_dir
    _say(f"all {count} stages complete; the final model is {previous / 'model'}")
    return previous


def _gate_summary(result: dict[str, Any]) -> str:
    parts = [f"perplexity {result['perplexity']:.4g}" if "perplexity" in result else "",
             f"passkey {result['passkey_accuracy']:.3f}" if "passkey_accuracy" in result else ""]
    return ", ".join(p for p in parts if p) + f" at {result['length']} tokens"
