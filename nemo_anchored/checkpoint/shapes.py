"""A checkpoint's tensor index (``.metadata``) checked against its data files and against the
model before anything is loaded, so that a damaged file or another architecture is named
(the file; the tensor, both shapes and the dimension that differs) instead of surfacing as an
unpickling or shape error from deep inside torch.distributed.checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

# Which architecture dimension each axis of a policy tensor is (megatron's GPT; by the last two
# parts of the name, layer tensors without their stacked layer axis), for shape errors.
_AXES = {
    "word_embeddings.weight": ("padded vocabulary size", "hidden size"),
    "output_layer.weight": ("padded vocabulary size", "hidden size"),
    "linear_qkv.weight": ("attention heads, query groups or head size", "hidden size"),
    "linear_qkv.bias": ("attention heads, query groups or head size",),
    "linear_proj.weight": ("hidden size", "attention heads or head size"),
    "linear_proj.bias": ("hidden size",),
    "linear_fc1.weight": ("ffn hidden size", "hidden size"),
    "linear_fc1.bias": ("ffn hidden size",),
    "linear_fc2.weight": ("hidden size", "ffn hidden size"),
    "linear_fc2.bias": ("hidden size",),
    "linear_qkv.layer_norm_weight": ("hidden size",),
    "linear_fc1.layer_norm_weight": ("hidden size",),
    "input_layernorm.weight": ("hidden size",),
    "pre_mlp_layernorm.weight": ("hidden size",),
    "final_layernorm.weight": ("hidden size",),
}
_LAYER_PREFIX = "decoder.layers."


def _differing_dimensions(key: str, saved: Sequence[int], wanted: Sequence[int]) -> str:
    """Which architecture dimensions tell the shapes of policy tensor ``key`` apart."""
    names = (("number of layers",) if key.startswith(_LAYER_PREFIX) else ()) \
        + _AXES.get(".".join(key.split(".")[-2:]), ())
    axes = [axis for axis in range(len(saved)) if saved[axis] != wanted[axis]] \
        if len(saved) == len(wanted) else []
    if not axes or max(axes) >= len(names):
        return "the architectures differ"
    differing = list(dict.fromkeys(names[axis] for axis in axes))
    return f"{' and '.join(differing)} {'differs' if len(differing) == 1 else 'differ'}"


def index_mismatch(path: Path, model_sharded: Dict[str, Any]) -> Optional[str]:
    """What in the checkpoint's tensor index (``.metadata``) disagrees with its data files or
    with the model, or None. Cheap (no data is read): it names a missing or truncated file even
    in a checkpoint saved without checksums, and a tensor of another shape (both shapes, and
    the architecture dimension that differs)."""
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # absent, truncated, or does not unpickle
        return (f"checkpoint {path}: file .metadata (its tensor index) is missing or corrupt: "
                f"{type(err).__name__}: {err}")
    needed: Dict[str, int] = {}  # bytes each data file must have at least
    for item in (index.storage_data or {}).values():
        end = item.offset + item.length
        needed[item.relative_path] = max(end, needed.get(item.relative_path, 0))
    for name, size in sorted(needed.items()):
        if not (path / name).is_file():
            return f"checkpoint {path}: file {name} is missing"
        have = (path / name).stat().st_size
        if have < size:
            return (f"checkpoint {path}: file {name} is truncated: {have} bytes, its index "
                    f"needs {size}")
    # Factories (the fused linear_fc1) make their tensors only while loading; their dimensions
    # show in other tensors (linear_fc2).
    for tensor in nested_values(model_sharded):
        entry = index.state_dict_metadata.get(getattr(tensor, "key", None))
        if not isinstance(tensor, ShardedTensor) or not isinstance(entry, TensorStorageMetadata):
            continue  # absent tensors are reported by _load, with every other one
        have, want = tuple(entry.size), tuple(tensor.global_shape)
        # megatron lets the vocabulary padding (first axis) differ, loading the rows both have;
        # the vocabulary itself is compared through the marker.
        first = 1 if tensor.allow_shape_mismatch else 0
        if have[first:] != want[first:]:
            return (f"checkpoint {path} has {tensor.key} of shape {have}, the model {want}: "
                    f"{_differing_dimensions(tensor.key, have, want)}")
    return None
