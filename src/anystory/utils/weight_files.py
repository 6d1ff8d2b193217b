"""The safetensors files of one model folder: a single file, or the shards of an index.

`save_pretrained(max_shard_size=...)` (diffusers and transformers alike) splits a model
into `<name>-0000k-of-0000n.safetensors` files listed by `<name>.safetensors.index.json`;
a full-size SDXL ReferenceNet in fp32 comes close to diffusers' default shard size, and
the bundled mini weights are sharded on purpose (every file under 5 MB). Code that reads
a folder's tensors itself, rather than through `from_pretrained`, goes through here so
that both layouts read the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def weight_files(folder: str | Path, name: str | None = None) -> list[Path]:
    """The files holding a model folder's weights: `name` (e.g.
    "diffusion_pytorch_model.safetensors") or the shards its index names; with no `name`,
    the folder's only index or only safetensors file. Raises FileNotFoundError naming what
    is missing."""
    folder = Path(folder)
    indexes = [folder / f"{name}.index.json"] if name else sorted(folder.glob("*.safetensors.index.json"))
    indexes = [index for index in indexes if index.is_file()]
    if len(indexes) > 1:
        raise FileNotFoundError(f"{folder}: more than one shard index ({', '.join(i.name for i in indexes)})")
    if indexes:
        return _shards(indexes[0])
    files = [folder / name] if name else sorted(folder.glob("*.safetensors"))
    files = [file for file in files if file.is_file()]
    if len(files) != 1:
        wanted = name or "one .safetensors file or shard index"
        raise FileNotFoundError(f"{folder}: expected {wanted}, found {len(files)} safetensors files")
    return files


def _shards(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not weight_map:
        raise FileNotFoundError(f"{index} has no weight_map")
    shards = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"{index.name} names shards that are not in {index.parent}: {missing}")
    return shards


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape across the files, read from their headers (no data loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, in one state dict."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state
