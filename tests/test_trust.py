"""What longtune loads from disk cannot run code, and nothing is downloaded.

A shared checkpoint whose pickles were crafted (DCP's `.metadata`, DeepSpeed's `*.pt`) is refused with one
error line before anything is unpickled, and the loaders themselves enforce the same allow-lists; a
legitimate checkpoint still resumes bit-identically (native and DeepSpeed). A Hub tokenizer id or Hub
attention kernel is refused, and the CLIs switch the Hugging Face libraries offline.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import BIN, longtune, metrics, run, subprocess_env
from longtune.parallel.safe_load import (
    SafeFileSystemReader,
    UnsafeCheckpointError,
    deepspeed_safe_globals,
    load_dcp_metadata,
    safe_dcp_load,
    scan_checkpoint,
    weights_only_loads,
)


class _Evil:
    """Unpickling this creates the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refresh_manifest(ckpt: Path) -> None:
    """A crafted checkpoint comes with a matching manifest (an attacker rewrites it too), if this version
    of longtune writes manifests."""
    from longtune.train import checkpoint

    if hasattr(checkpoint, "write_manifest") and (ckpt / getattr(checkpoint, "MANIFEST_FILE", "")).is_file():
        checkpoint.write_manifest(ckpt)


def _one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


# --- the loaders, in process -------------------------------------------------------------------------------


def test_dcp_roundtrip_through_the_safe_reader_and_crafted_metadata_refused(tmp_path):
    marker = tmp_path / "marker"
    state = {"w": torch.arange(6.0).reshape(2, 3), "extra": {"lr": 0.1, "betas": (0.9, 0.99), "name": "x"}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    target = {"w": torch.zeros(2, 3), "extra": {"lr": 0.0, "betas": (0.0, 0.0), "name": ""}}
    with weights_only_loads():  # the non-tensor values go through torch.load(weights_only=False) in DCP
        dcp.load(target, storage_reader=SafeFileSystemReader(str(tmp_path / "ckpt")))
    assert torch.equal(target["w"], state["w"]) and target["extra"] == state["extra"]

    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"names io\.open"):
        load_dcp_metadata(tmp_path / "ckpt" / ".metadata")
    with pytest.raises(UnsafeCheckpointError, match=r"names io\.open"):
        safe_dcp_load(target, tmp_path / "ckpt")  # what the native backend calls
    with pytest.raises(UnsafeCheckpointError):
        scan_checkpoint(tmp_path / "ckpt")
    # A crafted non-tensor value (stored by torch.save inside the .distcp file) is refused as well.
    dcp.save({"w": state["w"], "extra": _Evil(marker)}, checkpoint_id=str(tmp_path / "ckpt2"))
    with pytest.raises(UnsafeCheckpointError, match=r"names io\.open"):
        safe_dcp_load({"w": torch.zeros(2, 3), "extra": None}, tmp_path / "ckpt2")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_forced_weights_only_refuses_crafted_torch_files(tmp_path, fmt):
    marker, path = tmp_path / "marker", tmp_path / "mp_rank_00_model_states.pt"
    if fmt == "zip":
        torch.save({"module": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        with weights_only_loads(deepspeed_safe_globals(), what=str(path)):
            torch.load(path, weights_only=False)  # what DeepSpeed's checkpoint engine calls
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the load


# --- end to end: crafted and legitimate checkpoints --------------------------------------------------------

_ARGS = ["tiny-smoke", "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=5",
         "train.progress=false", "train.export=false"]
_BACKENDS = {
    "native": [],
    "deepspeed": ["parallel.backend=deepspeed", "parallel.dp=2"],
}


def _craft(ckpt: Path, backend: str, marker: Path) -> None:
    if backend == "native":
        (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    else:
        torch.save({"module": _Evil(marker)}, ckpt / "deepspeed" / "mp_rank_00_model_states.pt")
        for optim in (ckpt / "deepspeed").glob("*optim_states.pt"):
            torch.save({"optimizer_state_dict": _Evil(marker)}, optim)
    _refresh_manifest(ckpt)


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "deepspeed" else b
                                     for b in _BACKENDS])  # slow: CI time; the scan is the same for both
def test_crafted_checkpoint_is_refused_and_a_real_one_resumes_bit_identically(tmp_path, backend):
    args = [*_ARGS, *_BACKENDS[backend]]
    full = tmp_path / "full"
    longtune("train", *args, f"train.output_dir={full}")
    # Interrupted after step 2: the same dir without the step-4 checkpoint (metrics past 2 are trimmed by
    # the resume itself).
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    crafted = tmp_path / "crafted"
    shutil.copytree(cut, crafted)

    marker = tmp_path / "marker"
    _craft(crafted / "checkpoints" / "step_00000002", backend, marker)
    proc = longtune("train", *args, f"train.output_dir={crafted}", check=False)
    line = _one_error_line(proc)
    assert "refusing to load" in line and "io.open" in line, line
    assert not marker.exists()

    proc = longtune("train", *args, f"train.output_dir={cut}")
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a[2:], b[2:], strict=True):
        assert (ma["loss"], ma["lr"], ma["grad_norm"]) == (mb["loss"], mb["lr"], mb["grad_norm"])


# --- nothing is downloaded ---------------------------------------------------------------------------------


class _Listener:
    """A local 'Hub' that counts connections: HF_ENDPOINT points here, so any fetch would show up."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections, self._stop = 0, False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def hub():
    listener = _Listener()
    yield listener
    listener.close()


def _unset_offline(env: dict[str, str]) -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(key, None)


def test_hub_tokenizer_is_refused_without_a_network_attempt(tmp_path, hub):
    env = subprocess_env(HF_ENDPOINT=hub.url)
    _unset_offline(env)
    proc = run([str(BIN / "longtune"), "train", "tiny-smoke", "model.tokenizer=some-org/some-tokenizer",
                f"train.output_dir={tmp_path}"], env=env, check=False)
    line = _one_error_line(proc)
    assert "model.tokenizer 'some-org/some-tokenizer'" in line and "does not download" in line, line
    assert hub.connections == 0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_load_tokenizer_refuses_hub_ids():
    from longtune.train.tokenizer import TokenizerSourceError, load_run_tokenizer

    with pytest.raises(TokenizerSourceError, match="does not download"):
        load_run_tokenizer("some-org/some-tokenizer", None)


def test_hub_attention_kernel_is_refused_by_the_recipe(tmp_path):
    from longtune.parallel.sp_attention import ATTN_IMPLEMENTATION
    from longtune.train.recipe import SP_ATTN_IMPLEMENTATION, RecipeError, known_attn_implementations, recipe_from_dict

    with pytest.raises(RecipeError, match=r"model\.attn_implementation: 'kernels-community/flash-attn' is not a "
                                          r"known attention implementation \(a Hub kernel repo"):
        recipe_from_dict({"model": {"attn_implementation": "kernels-community/flash-attn"}})
    with pytest.raises(RecipeError, match="not a known attention implementation"):
        recipe_from_dict({"model": {"attn_implementation": "no_such_attention"}})
    assert SP_ATTN_IMPLEMENTATION == ATTN_IMPLEMENTATION
    for name in ("eager", "sdpa", "flash_attention_2", ATTN_IMPLEMENTATION):
        assert recipe_from_dict({"model": {"attn_implementation": name}}).model.attn_implementation == name
    assert {"eager", "sdpa", "flash_attention_2", "flex_attention"} <= set(known_attn_implementations())

    proc = longtune("train", "tiny-smoke", "model.attn_implementation=kernels-community/flash-attn",
                    f"train.output_dir={tmp_path}", check=False)
    assert "kernels-community/flash-attn" in _one_error_line(proc)


def test_clis_switch_the_hub_offline(monkeypatch):
    from longtune.train import cli
    from longtune.train.commands import prep as prep_cli

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    cli.offline_environment()
    assert all(os.environ[key] == "1" for key in keys)
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit):
        prep_cli.main(["--help"])
    assert all(os.environ[key] == "1" for key in keys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's explicit setting wins
    cli.offline_environment()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
