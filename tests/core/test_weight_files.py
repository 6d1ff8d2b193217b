import json

import pytest
import torch
from safetensors.torch import save_file

from anystory.utils.weight_files import load_tensors, tensor_shapes, weight_files


def test_an_index_gathers_its_shards_into_one_state_dict(tmp_path):
    save_file({"a": torch.ones(2, 3)}, tmp_path / "m-1.safetensors")
    save_file({"b": torch.arange(4.0)}, tmp_path / "m-2.safetensors")
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    files = weight_files(tmp_path)
    assert [f.name for f in files] == ["m-1.safetensors", "m-2.safetensors"]
    assert tensor_shapes(files) == {"a": (2, 3), "b": (4,)}
    state = load_tensors(files)
    assert torch.equal(state["b"], torch.arange(4.0)) and torch.equal(state["a"], torch.ones(2, 3))


def test_ambiguous_or_empty_folders_are_refused_with_the_count(tmp_path):
    with pytest.raises(FileNotFoundError, match="found 0"):
        weight_files(tmp_path)
    save_file({"a": torch.ones(1)}, tmp_path / "x.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "y.safetensors")
    with pytest.raises(FileNotFoundError, match="found 2"):
        weight_files(tmp_path)
    assert weight_files(tmp_path, "y.safetensors") == [tmp_path / "y.safetensors"]


def test_an_index_naming_a_missing_shard_says_which(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        weight_files(tmp_path)
