"""Reading a DCP checkpoint's ``.metadata`` without running code from it.

``torch.distributed.checkpoint.FileSystemReader.read_metadata`` (torch 2.13)
calls ``pickle.load`` on ``CHECKPOINT/.metadata``: a crafted file runs any
command on every rank that loads it. ``SafeFileSystemReader`` unpickles it with
an allow-list of the classes DCP's own metadata uses (found by saving one and
listing every ``find_class`` call), then checks the object's structure:

* only tensor entries (``TensorStorageMetadata``): a ``BytesStorageMetadata``
  entry would make DCP ``torch.load(..., weights_only=False)`` a data file,
  which is code execution again; moekit never saves non-tensor values;
* data files named like DCP's own (``__<rank>_<n>.distcp``) directly in the
  checkpoint directory, with non-negative offsets and lengths, no transforms.

Tensor data files are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from moekit.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup by name among torch.layout values
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
})
DATA_FILE = re.compile(r"__\d{1,6}_\d{1,6}\.distcp")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed: a DCP metadata file may only name "
            "DCP's metadata classes, torch.Size, dtypes and layouts")


def read_dcp_metadata(path: str) -> Metadata:
    """Unpickle a ``.metadata`` file with the allow-list, then check its structure."""
    try:
        with open(path, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path} is not a safe DCP metadata file: {e}") from e
    problem = _structure_problem(metadata)
    if problem:
        raise CheckpointError(f"{path} is not a valid DCP metadata file: {problem}")
    return metadata


def _structure_problem(md: Any) -> str | None:
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict):
        return f"the top object is a {type(md).__name__}, not a Metadata"
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or type(entry) is not TensorStorageMetadata:
            return f"entry {key!r} is a {type(entry).__name__}; only tensors are allowed"
        if not _tensor_entry_ok(entry):
            return f"entry {key!r} has malformed properties, size or chunks"
    if not isinstance(md.storage_data, dict):
        return "storage_data is not a dict"
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            return f"storage_data holds {type(index).__name__} -> {type(info).__name__}"
        if not _storage_info_ok(info):
            return f"storage entry {index.fqn!r} names {info.relative_path!r} at " \
                   f"offset {info.offset!r}, length {info.length!r}, transforms " \
                   f"{info.transform_descriptors!r}: only __<rank>_<n>.distcp files in the " \
                   "checkpoint directory, non-negative ints and no transforms are allowed"
    if md.storage_meta is not None and type(md.storage_meta) is not StorageMeta:
        return f"storage_meta is a {type(md.storage_meta).__name__}"
    return None


def _tensor_entry_ok(entry: TensorStorageMetadata) -> bool:
    props = entry.properties
    return (type(props) is TensorProperties and isinstance(props.dtype, torch.dtype)
            and type(entry.size) is torch.Size and isinstance(entry.chunks, list)
            and all(type(c) is ChunkStorageMetadata and type(c.offsets) is torch.Size
                    and type(c.sizes) is torch.Size for c in entry.chunks))


def _storage_info_ok(info: _StorageInfo) -> bool:
    name = info.relative_path
    return (isinstance(name, str) and DATA_FILE.fullmatch(name) is not None
            and PurePosixPath(name).name == name
            and all(type(v) is int and v >= 0 for v in (info.offset, info.length))
            and not info.transform_descriptors)


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` never runs code from the file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
