"""Lazy, sliced reads of a safetensors checkpoint (one file or an index of shards).

Every rank opens the same files and reads only the slices its shard plan names; `bytes_read`
counts what was materialised so a test can show that a rank of tp=4 reads about a quarter of the
layer bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tpserve.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.device = device
        self.bytes_read = 0
        self._where: dict[str, Path] = {}
        self._files: dict[Path, object] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid safetensors index (it needs a "
                                      f"'weight_map'); re-download or re-save the checkpoint") from None
            for name, file in weight_map.items():
                shard = self.path / file
                if not shard.is_file():
                    raise CheckpointError(f"{index} maps {name!r} to {file!r}, which does not "
                                          f"exist in {self.path}; download the missing shard")
                self._where[name] = shard
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path} holds no *.safetensors file; tpserve reads "
                                      f"safetensors checkpoints only")
            for file in files:
                for name in self._open(file).keys():
                    self._where[name] = file

    def _open(self, file: Path):
        if file not in self._files:
            try:
                self._files[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file} cannot be read as safetensors ({e}); the file is "
                                      f"truncated or corrupt, re-download it") from None
        return self._files[file]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from {self.path}; the checkpoint "
                                  f"does not match config.json (wrong model_type or incomplete files)")
        return self._open(self._where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read `name`, optionally only rows [r0, r1) and columns [c0, c1) of a 1-D/2-D tensor.

        `shape`, when given, is the full shape the model config implies; a mismatch is reported
        naming the tensor.
        """
        sl = self._slice(name)
        full = tuple(sl.get_shape())
        if shape is not None and full != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(full)} but config.json implies "
                                  f"{list(shape)}; the checkpoint and its config do not match")
        index = []
        if rows is not None:
            index.append(slice(*rows))
        if cols is not None:
            if rows is None:
                index.append(slice(None))
            index.append(slice(*cols))
        try:
            t = sl[tuple(index)] if index else sl[:]
        except Exception as e:  # safetensors raises a bare Exception on short files
            raise CheckpointError(f"tensor {name!r} could not be read ({e}); the file "
                                  f"{self._where[name].name} is truncated or corrupt") from None
        self.bytes_read += t.numel() * t.element_size()
        return t.to(self.device)
