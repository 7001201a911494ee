"""Reading checkpoints back without running code from them.

A checkpoint dir may come from someone else, and every pickle in it could name any callable. Three kinds of
pickle are read on resume, each through an allow-list:

- DCP's `.metadata` (a plain pickle): `SafeFileSystemReader` unpickles it with `RestrictedUnpickler`, which
  resolves only DCP's metadata classes, torch dtypes / `Size` / layouts, paths and a few builtins.
- the non-tensor values DCP stores in its `.distcp` files, and every DeepSpeed `*.pt` file: torch's own
  `weights_only` unpickler (forced on inside `weights_only_loads`, whatever the caller asked for), with
  only the few DeepSpeed classes its ZeRO checkpoints hold added to torch's allow-list.
- `scan_checkpoint` checks a whole checkpoint dir statically (no unpickling) before any process starts.

A pickle that names anything else raises `UnsafeCheckpointError`, whose message names the file and the global.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import StorageMeta

from longtune.data_prep.user_error import UserError


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint file whose pickle names a global outside the allow-list (or is not a pickle at all)."""


def _dcp_metadata_globals() -> set[tuple[str, str]]:
    names = {(dcp_metadata.__name__, name) for name, obj in vars(dcp_metadata).items()
             if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
    names |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch", "Size"), ("torch.serialization", "_get_layout"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}
    names |= {("torch", name) for name, obj in vars(torch).items() if isinstance(obj, torch.dtype)}
    return names


#: (module, name) pairs a DCP `.metadata` pickle may name: what torch's own `dcp.save` writes.
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(_dcp_metadata_globals())


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `allowed` (module, name) pairs."""

    def __init__(self, file, allowed: frozenset[tuple[str, str]], what: str):
        super().__init__(file)
        self._allowed, self._what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafeCheckpointError(f"refusing to load {self._what}: its pickle names {module}.{name}, "
                                        "which a checkpoint never holds (a crafted or foreign file?)")
        return super().find_class(module, name)


def load_dcp_metadata(path: str | os.PathLike) -> dcp_metadata.Metadata:
    """Unpickle a DCP `.metadata` file through the allow-list."""
    try:
        with open(path, "rb") as stream:
            metadata = RestrictedUnpickler(stream, DCP_METADATA_GLOBALS, str(path)).load()
    except (UnsafeCheckpointError, OSError):  # OSError: no such file (DCP then tries the rank-local one)
        raise
    except Exception as exc:  # truncated or not a pickle
        raise UnsafeCheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"refusing to load {path}: it holds a {type(metadata).__name__}, "
                                    "not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose `read_metadata` unpickles through the allow-list (torch's uses `pickle.load`)."""

    refusal: UnsafeCheckpointError | None = None
    """The first refusal: DCP reports errors as a `CheckpointException` made of strings."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        try:
            metadata = load_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        except UnsafeCheckpointError as exc:
            self.refusal = self.refusal or exc
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def deepspeed_safe_globals() -> list[Any]:
    """The classes a DeepSpeed ZeRO checkpoint holds beyond tensors and containers: the loss scaler, the
    ZeRO stage enum and the parameter-fragment addresses of the optimizer states."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(extra_globals: Sequence[Any] = (), what: str = "the checkpoint") -> Iterator[None]:
    """Every `torch.load` inside runs torch's `weights_only` unpickler, even where the caller passes
    `weights_only=False` (DCP's non-tensor values, DeepSpeed's checkpoint engine): torch's
    `TORCH_FORCE_WEIGHTS_ONLY_LOAD` switch, set for the duration, with `extra_globals` allowed too. A
    refused pickle becomes `UnsafeCheckpointError`."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            yield
    except (pickle.UnpicklingError, CheckpointException) as exc:
        if isinstance(exc, CheckpointException) and "Weights only load failed" not in str(exc):
            raise  # DCP flattens its ranks' errors into one message
        named = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f"names {named.group(1)}, which a checkpoint never holds" if named else "is not a weights-only pickle"
        raise UnsafeCheckpointError(f"refusing to load {what}: a pickle in it {detail} "
                                    "(a crafted or foreign file?)") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def safe_dcp_load(state_dict: dict[str, Any], checkpoint_dir: str | os.PathLike) -> None:
    """`dcp.load` in place, with the metadata through the allow-list and the non-tensor values weights-only;
    a refusal raises `UnsafeCheckpointError` (not DCP's flattened `CheckpointException`)."""
    import torch.distributed.checkpoint as dcp

    reader = SafeFileSystemReader(str(checkpoint_dir))
    try:
        with weights_only_loads(what=str(checkpoint_dir)):
            dcp.load(state_dict, storage_reader=reader)
    except CheckpointException as exc:
        if reader.refusal is not None:
            raise reader.refusal from exc
        raise


def _unsafe_globals_in_torch_file(path: Path) -> list[str]:
    """The globals of a `torch.save` zip file outside torch's weights-only allow-list, by a static scan of
    its pickle opcodes (nothing is unpickled). Legacy (non-zip) files are left to the loader's check."""
    if not zipfile.is_zipfile(path):
        return []
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__name__}"


def scan_checkpoint(path: Path) -> None:
    """Check every pickle of a checkpoint dir against the allow-lists, before loading; raises
    `UnsafeCheckpointError` naming the first offending file. (The loaders enforce the same lists.)"""
    deepspeed_names: set[str] | None = None
    for file in sorted(Path(path).rglob("*")):
        if not file.is_file():
            continue
        if file.name.endswith(".metadata"):
            load_dcp_metadata(file)
        elif file.suffix == ".pt":
            try:
                bad = _unsafe_globals_in_torch_file(file)
            except Exception as exc:
                raise UnsafeCheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc
            if bad and deepspeed_names is None:  # DeepSpeed is imported only for files that need it
                try:
                    deepspeed_names = {_qualname(c) for c in deepspeed_safe_globals()}
                except ImportError:
                    deepspeed_names = set()
            bad = [name for name in bad if name not in (deepspeed_names or ())]
            if bad:
                raise UnsafeCheckpointError(f"refusing to load {file}: its pickle names {', '.join(bad)}, "
                                            "which a checkpoint never holds (a crafted or foreign file?)")


__all__ = ["DCP_METADATA_GLOBALS", "RestrictedUnpickler", "SafeFileSystemReader", "UnsafeCheckpointError",
           "deepspeed_safe_globals", "load_dcp_metadata", "safe_dcp_load", "scan_checkpoint", "weights_only_loads"]
