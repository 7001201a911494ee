"""`longtune train` checks what needs the model before it starts any process: layouts that do not fit the
model's heads, layers or head_dim, and model dirs that cannot be loaded, end in one `longtune: error:` line
and exit code 2, with no torchrun started (the workers used to find them, one traceback per rank)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import longtune
from longtune.train.model import shipped_model_dir

BASE = ["train.max_steps=2", "train.progress=false", "train.export=false"]


def _refused(tmp_path: Path, *args: str, expect: str) -> str:
    out = tmp_path / "run"
    proc = longtune("train", *args, *BASE, f"train.output_dir={out}", check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longtune: error:")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert expect in errors[0], errors
    assert "starting" not in proc.stderr and "torch.distributed" not in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "a refused run must not prepare its run dir"
    return errors[0]


LAYOUTS = {
    "sp-vs-processes": (["launch.nproc_per_node=3", "parallel.sp.ring=2"],
                        "world size 3 is not divisible by pp × sp × tp (= 2)"),
    "ulysses-vs-heads": (["parallel.sp.ulysses=8"], "parallel.sp.ulysses 8 does not divide the model's 4 query heads"),
    "ulysses-vs-heads-per-tp-rank": (["parallel.sp.ulysses=4", "parallel.tp=2"],
                                     "parallel.sp.ulysses 4 does not divide the model's 4 query heads / parallel.tp 2"),
    "tp-vs-heads": (["parallel.tp=3"], "parallel.tp 3 does not divide the model's num_attention_heads 4"),
    "pp-vs-layers": (["parallel.pp=4"], "parallel.pp 4 exceeds the model's 2 decoder layers"),
    "longrope-vs-head-dim": (["extension.method=longrope", "extension.target_length=1024",
                              "extension.options={long_factor: [1, 2], short_factor: [1, 2]}"],
                             "must be a list of head_dim/2 = 16 positive numbers"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_layouts_that_do_not_fit_the_model_are_refused_before_launch(tmp_path, case):
    overrides, expect = LAYOUTS[case]
    _refused(tmp_path, "tiny-smoke", *overrides, expect=expect)


def _model_dir(tmp_path: Path, weights: bool = True) -> Path:
    src, dst = shipped_model_dir("tiny-base-256"), tmp_path / "model"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if weights:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def test_a_config_json_that_is_not_json_is_refused(tmp_path):
    model = _model_dir(tmp_path)
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 128,')
    _refused(tmp_path, "tiny-smoke", f"model.name_or_path={model}", "parallel.dp=2",
             expect="config.json is not readable JSON")


def test_a_model_dir_without_weights_is_refused(tmp_path):
    model = _model_dir(tmp_path, weights=False)
    _refused(tmp_path, "tiny-smoke", f"model.name_or_path={model}", "parallel.dp=2",
             expect="has a config but no weights")


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    model = _model_dir(tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, "tiny-smoke", f"model.name_or_path={model}", "parallel.dp=2",
             expect="model.safetensors is not a complete safetensors file")


def test_a_good_model_dir_passes_preflight():
    """The shipped model dir passes the file checks, and a layout that fits passes the layout rules."""
    from longtune.train.model import check_model_files, resolve_model_source
    from longtune.train.model_checks import preflight_model
    from longtune.train.recipe import load_recipe

    check_model_files(resolve_model_source("tiny-base-256"))
    preflight_model(load_recipe("tiny-smoke", ["parallel.sp.ulysses=2", "parallel.tp=2"]), 4)
