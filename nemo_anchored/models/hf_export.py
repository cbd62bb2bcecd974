"""nemo-anchored -> Hugging Face: ``nemo-anchored convert mcore-to-hf``.

Exports a nemo-anchored checkpoint (any layout it was saved at) with the architecture and
tokenizer of the hf-to-mcore output it started from: config.json, generation_config.json, the
tokenizer files and safetensors shards (``--max-shard-size``, with
``model.safetensors.index.json`` when there is more than one). It streams: the embedding, each
layer and the head are read from the checkpoint one at a time (torch.distributed.checkpoint
reads just that slice of megatron's layer-stacked tensors) and each shard file is written as
soon as its tensors are complete. Padded vocabulary rows are cut. It writes ``HF_DIR.tmp`` and
renames it (``atomic.staged_directory``).

The folder loads in transformers 4.5x as in 5.x (evaluation and serving stacks pin either):
config.json also carries the pre-5 RoPE keys, and the tokenizer class transformers 5 writes,
``TokenizersBackend``, is named ``PreTrainedTokenizerFast`` (both versions load that name from
tokenizer.json). Every file gets the mode a new file gets under the process's umask (0644 under
the usual 022): safetensors writes its files owner-only, which a serving job running as another
user of the group could not read, and a umask of 077 still keeps the export private.
"""
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from nemo_anchored.atomic import staged_directory
from nemo_anchored.checkpoint.format import read_marker, verify_files
from nemo_anchored.config import GPTConfig
from nemo_anchored.models.gpt import TORCH_DTYPES
from nemo_anchored.models.hf_import import _add_legacy_rope_keys as add_legacy_rope_keys
from nemo_anchored.models.hf_layout import (HF_SUBDIR, TOKENIZER_SUBDIR, ConversionError,
                                            TensorMap, check_finite, fuse, gpt_config_from_hf,
                                            hf_shapes, load_hf_config, split, tensor_maps)


# ------------------------------------------------------------------------------ mcore-to-hf


def parse_size(text) -> int:
    """Bytes in ``5GB`` (10^9), ``500MiB`` (2^20), ``1000`` ..."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if match is None or match.group(2).upper() not in units:
        raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size < 1:
        raise ConversionError(f"--max-shard-size {text!r} must be positive")
    return size


def plan_shards(sizes: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Tensor names split, in order, into shards of at most ``max_bytes`` (a larger tensor gets
    a shard of its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def _shard_file_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _check_checkpoint_shapes(path: Path, metadata, cfg: GPTConfig, source: str) -> None:
    """The checkpoint holds exactly the tensors of ``cfg``'s architecture, in its shapes."""
    expected = {}
    hf = hf_shapes(cfg)
    for m in tensor_maps(cfg):
        shape = fuse(m.kind, [torch.empty(hf[name], device="meta") for name in m.hf], cfg).shape
        expected[m.checkpoint] = shape if m.layer is None else (cfg.num_layers, *shape)
    model_keys = {k for k in metadata if k.startswith(("embedding.", "decoder.", "output_layer."))}
    missing, unexpected = sorted(set(expected) - model_keys), sorted(model_keys - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint {path} does not match the architecture in {source}: missing "
            f"{missing[:5]}, not in that architecture {unexpected[:5]}")
    for key, shape in expected.items():
        got = metadata[key][0]
        vocab_rows_ok = (key in ("embedding.word_embeddings.weight", "output_layer.weight")
                         and got[1:] == tuple(shape[1:]) and got[0] >= cfg.vocab_size)
        if got != tuple(shape) and not vocab_rows_ok:
            raise ConversionError(f"checkpoint {path}: {key} has shape {got}, {source} implies "
                                  f"{tuple(shape)}")


def _checkpoint_metadata(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """(global shape, dtype) of every tensor in the torch_dist checkpoint at ``path``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, RuntimeError) as err:
        raise ConversionError(f"checkpoint {path}: unreadable tensor index: {err}") from err
    return {key: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def _read_checkpoint(path: Path, metadata, cfg: GPTConfig
                     ) -> Iterator[Tuple[TensorMap, torch.Tensor]]:
    """Each megatron tensor of ``cfg`` at TP=1 (layer tensors one layer at a time), in the
    order of ``tensor_maps``: the embedding, then layer by layer, then the final norm and head.

    torch.distributed.checkpoint reads just the requested slice of each global tensor (a layer
    of megatron's layer-stacked tensors), in this process alone (no process group).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Fills each requested tensor from the slice of its global tensor at ``offsets``."""

        def __init__(self, offsets: Dict[str, Tuple[int, ...]]):
            super().__init__()
            self.offsets = offsets

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan([item for key, tensor in self.state_dict.items()
                             for item in create_read_items_for_chunk_list(
                                 key, self.metadata.state_dict_metadata[key],
                                 [ChunkStorageMetadata(torch.Size(self.offsets[key]),
                                                       tensor.shape)])])

        def lookup_tensor(self, index) -> torch.Tensor:
            # The read items name the slice by its global offset; the tensor is the slice.
            return self.state_dict[index.fqn]

    maps = tensor_maps(cfg)
    groups = [[maps[0]]] + [[m for m in maps if m.layer == i] for i in range(cfg.num_layers)]
    groups.append([m for m in maps[1:] if m.layer is None])
    for group in groups:
        request, offsets = {}, {}
        for m in group:
            shape, dtype = metadata[m.checkpoint]
            if m.layer is None:
                request[m.checkpoint] = torch.empty(shape, dtype=dtype)
                offsets[m.checkpoint] = (0,) * len(shape)
            else:  # one layer of the layer-stacked tensor
                request[m.checkpoint] = torch.empty((1, *shape[1:]), dtype=dtype)
                offsets[m.checkpoint] = (m.layer,) + (0,) * (len(shape) - 1)
        dcp.load(request, checkpoint_id=str(path), planner=SlicePlanner(offsets), no_dist=True)
        for m in group:
            tensor = request[m.checkpoint]
            yield m, tensor if m.layer is None else tensor[0]


def convert_mcore_to_hf(checkpoint, base, out, *, max_shard_size="5GB",
                        dtype: Optional[str] = None) -> Path:
    """Export the nemo-anchored checkpoint ``checkpoint`` as a Hugging Face model folder ``out``
    with the architecture and tokenizer of ``base`` (an hf-to-mcore output directory). ``dtype``
    defaults to the checkpoint's. Returns ``out``."""
    checkpoint, base, out = Path(checkpoint), Path(base), Path(out).absolute()
    hf_dir, tokenizer_dir = base / HF_SUBDIR, base / TOKENIZER_SUBDIR
    if not (hf_dir / "config.json").is_file() or not tokenizer_dir.is_dir():
        raise ConversionError(f"--base {base}: not an hf-to-mcore output (needs "
                              f"{HF_SUBDIR}/config.json and {TOKENIZER_SUBDIR}/)")
    if out.exists():
        raise ConversionError(f"--out {out} already exists; remove it or choose another")
    max_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    source = str(hf_dir / "config.json")
    cfg = gpt_config_from_hf(load_hf_config(hf_dir))
    marker = read_marker(checkpoint)
    if marker.get("vocab_size") not in (None, cfg.vocab_size):
        raise ConversionError(f"checkpoint {checkpoint} has a vocabulary of "
                              f"{marker['vocab_size']} tokens, {source} {cfg.vocab_size}")
    verify_files(checkpoint, marker)  # before any tensor is read: names a damaged file

    with staged_directory(out) as staging:
        metadata = _checkpoint_metadata(checkpoint)
        _check_checkpoint_shapes(checkpoint, metadata, cfg, source)
        stored = metadata["embedding.word_embeddings.weight"][1]
        out_dtype = TORCH_DTYPES[dtype] if dtype else stored
        sizes = [(name, math.prod(shape) * out_dtype.itemsize)
                 for name, shape in hf_shapes(cfg).items()]
        shards = plan_shards(sizes, max_bytes)
        files = _shard_file_names(len(shards))
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        pending: Dict[str, torch.Tensor] = {}
        shard_index = 0
        for m, tensor in _read_checkpoint(checkpoint, metadata, cfg):
            check_finite(tensor, f"checkpoint {checkpoint}: {m.checkpoint}"
                         + ("" if m.layer is None else f" (layer {m.layer})"))
            for name, part in zip(m.hf, split(m.kind, tensor, cfg)):
                # A copy of its own: safetensors refuses tensors that share storage.
                pending[name] = part.to(out_dtype, copy=True).contiguous()
                if part.dtype != out_dtype:  # checked above as it was; a cast may overflow
                    check_finite(pending[name], f"{name} cast to {out_dtype} (--dtype)")
            # Write each shard as soon as its tensors are complete.
            while shard_index < len(shards) and all(n in pending for n in shards[shard_index]):
                save_file({n: pending.pop(n) for n in shards[shard_index]},
                          str(staging / files[shard_index]), metadata={"format": "pt"})
                shard_index += 1
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                     "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((hf_dir / "config.json").read_text())
        config["dtype" if "dtype" in config else "torch_dtype"] = str(out_dtype).split(".")[-1]
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        add_legacy_rope_keys(staging / "config.json")
        if (hf_dir / "generation_config.json").is_file():
            shutil.copy2(hf_dir / "generation_config.json", staging)
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, staging / file.name)
        _name_tokenizer_class_for_every_version(staging / "tokenizer_config.json")
        _set_file_modes(staging)
    return out


# transformers 5's name for the generic tokenizer backed by tokenizer.json; 4.x has no such
# class and refuses the folder, while both versions load PreTrainedTokenizerFast from it.
_TOKENIZER_CLASS_RENAMES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _name_tokenizer_class_for_every_version(path: Path) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class")
    if name in _TOKENIZER_CLASS_RENAMES:
        config["tokenizer_class"] = _TOKENIZER_CLASS_RENAMES[name]
        path.write_text(json.dumps(config, indent=2) + "\n")


def _set_file_modes(folder: Path) -> None:
    """The mode open() would give a new file under the current umask, for every file in
    ``folder`` (safetensors creates its files 0600; copies keep their source's mode)."""
    umask = os.umask(0o022)  # reading the umask means setting it: restored at once
    os.umask(umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)
