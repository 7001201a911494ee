"""Bad input: one clear error, a non-zero exit, before heavy work, and no run dir that looks complete."""

from __future__ import annotations

import time

import pytest

from conftest import BIN, PYTHON, longtune, run, subprocess_env


def _fails(*args: str, match: str, **env: str):
    started = time.perf_counter()
    proc = longtune(*args, check=False, timeout=120, **env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longtune: error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]
    return time.perf_counter() - started


def test_missing_recipe(tmp_path):
    _fails("train", str(tmp_path / "none.yaml"), match="neither a file nor a shipped recipe")


def test_malformed_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    _fails("train", str(bad), match="cannot read it as YAML")


def test_unknown_key_and_bad_override(tmp_path):
    _fails("train", "tiny-smoke", "train.max_stepz=3", f"train.output_dir={tmp_path / 'r'}",
           match="unknown key 'train.max_stepz'")
    _fails("train", "tiny-smoke", "train.max_steps", match="section.key=value")
    assert not (tmp_path / "r").exists()


def test_missing_model_dir(tmp_path):
    _fails("train", "tiny-smoke", f"model.name_or_path={tmp_path / 'nope'}",
           f"train.output_dir={tmp_path / 'r'}", match="neither a local model dir nor a tiny flavour")
    assert not (tmp_path / "r").exists()


def test_missing_corpus(tmp_path):
    _fails("train", "tiny-smoke", f"data.path={tmp_path / 'corpus'}", match="is not a directory")


def test_world_size_the_recipe_cannot_use(tmp_path):
    # A launcher started 3 processes for a recipe that wants dp 2: every rank refuses before init.
    proc = run([PYTHON, "-m", "longtune.train", "tiny-smoke", "parallel.dp=2",
                f"train.output_dir={tmp_path / 'r'}"], check=False, timeout=120,
               env=subprocess_env(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT="1"))
    assert proc.returncode == 2
    assert "world size 3 does not match parallel.dp 2" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_recipes_listing():
    proc = run([str(BIN / "longtune"), "recipes"], timeout=60)
    assert "tiny-smoke" in proc.stdout
    for template in ("embedded-smoke", "multi-gpu", "zero3-extra"):  # prep, accelerate, deepspeed
        assert template in proc.stdout


@pytest.mark.parametrize("command", ["eval", "longrope-search", "plan"])
def test_delegated_commands_report_bad_input(command, tmp_path):
    proc = run([str(BIN / "longtune"), command, str(tmp_path / "no-model"), "--target-length", "512",
                "--out", str(tmp_path / "out")] if command == "longrope-search"
               else [str(BIN / "longtune"), command, str(tmp_path / "no-model")], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("longtune: error:")
    assert not (tmp_path / "out").exists()
