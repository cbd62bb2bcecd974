"""Hugging Face -> nemo-anchored: ``nemo-anchored convert hf-to-mcore``.

Reads a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` folder (config.json, tokenizer,
``*.safetensors``) and writes the directory described in ``hf_layout``, usable as
``model.base_checkpoint=DIR``.

With ``--tp N --pp M`` it runs N*M local gloo processes (CUDA hidden: conversion is CPU work);
each builds only its own shard of the megatron model and fills it tensor by tensor from the
safetensors files (``safe_open``: one Hugging Face tensor in memory at a time, plus the shard),
then all save one checkpoint together. Peak memory per process is about 1/(N*M) of the model
plus the tensor in conversion (at most the embedding, twice while its rows are padded). With
``--gguf-file`` transformers dequantizes the whole GGUF file into memory (once, in the parent
process), which writes the weights to a temporary safetensors file that the shard processes
then stream like any other checkpoint.

Atomicity: the checkpoint is saved to ``DIR.converting``, the tokenizer and configs are added
with its completeness marker withheld (``checkpoint.format.amend``), and it is renamed to
``DIR`` at the very end, so a conversion that dies half-way leaves no ``DIR`` and nothing that
loads; a re-run deletes the leftovers.
"""
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_anchored.atomic import tmp_path, write_text
from nemo_anchored.checkpoint.format import amend
from nemo_anchored.config import ConfigError, GPTConfig, check_layout
from nemo_anchored.models.hf_layout import (ARCHITECTURES, MODEL_YAML, TOKENIZER_SUBDIR,
                                            HF_SUBDIR, ConversionError, check_finite, fuse,
                                            gpt_config_from_hf, hf_shapes, load_hf_config,
                                            tensor_maps, transformers_offline)
from nemo_anchored.parallel.local_world import LocalWorldError, run_local_world

_STAGING_SUFFIX = ".converting"
_GGUF_WEIGHTS_SUFFIX = ".gguf-weights"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Buffers some older Llama checkpoints saved; recomputed from the config, never needed.
_IGNORED_HF_TENSOR = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------- Hugging Face checkpoints


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint folder, read one at a time.

    Uses ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file in
    the folder. Only headers are read up front; ``get`` reads one tensor.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._handles = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a safetensors index ({err})") from err
            if not isinstance(weight_map, dict) or not all(
                    isinstance(file, str) for file in weight_map.values()):
                raise ConversionError(f"{index}: not a safetensors index (its weight_map is no "
                                      f"object of tensor names to file names)")
            self._files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.folder}: no *.safetensors weights (PyTorch .bin "
                                      f"checkpoints are not supported; or pass --gguf-file)")
            self._files = {}
            for file in files:
                for name in self._open(file).keys():
                    if name in self._files:
                        raise ConversionError(f"tensor {name} is in both {self._files[name]} "
                                              f"and {file}")
                    self._files[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise ConversionError(f"{file} (listed in the safetensors index) does not exist")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ConversionError(f"{file}: unreadable safetensors file: {err}") from err
        return self._handles[file]

    def names(self) -> List[str]:
        return list(self._files)

    def file(self, name: str) -> Path:
        return self._files[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. ``BF16``."""
        return self._slice(name).get_dtype()

    def _slice(self, name: str):
        file = self._files[name]
        try:
            return self._open(file).get_slice(name)
        except ConversionError:
            raise
        except Exception as err:  # safetensors' own SafetensorError: the index misplaces it
            raise ConversionError(f"tensor {name}: the safetensors index maps it to {file}, "
                                  f"which does not hold it ({err})") from err

    def get(self, name: str) -> torch.Tensor:
        file = self._files[name]
        try:
            return self._open(file).get_tensor(name)
        except Exception as err:
            raise ConversionError(f"cannot read tensor {name} from {file}: {err}") from err


def check_hf_tensors(reader: SafetensorsCheckpoint, cfg: GPTConfig, config_source: str) -> None:
    """Every tensor ``cfg`` needs is present with the right shape and a float dtype, and there
    is no tensor the conversion would drop (headers only: nothing is loaded)."""
    expected = hf_shapes(cfg)
    names = set(reader.names())
    missing = [name for name in expected if name not in names]
    if missing:
        raise ConversionError(f"{reader.folder}: tensor(s) missing from the checkpoint: "
                              f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise ConversionError(f"tensor {name} in {reader.file(name)} has shape {got}, "
                                  f"{config_source} implies {shape}")
        if reader.dtype(name) not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name} in {reader.file(name)} has dtype "
                                  f"{reader.dtype(name)}; expected one of "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}")
    # Tied, a stored lm_head is a copy of the embedding (transformers 4 ignores it, 5 loads
    # it): one that differs is ambiguous, and would be dropped.
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if ignorable & names and not torch.equal(reader.get("lm_head.weight"),
                                             reader.get("model.embed_tokens.weight")):
        raise ConversionError(f"{reader.folder}: tie_word_embeddings is true ({config_source}) "
                              f"but lm_head.weight differs from model.embed_tokens.weight")
    unexpected = sorted(n for n in names - set(expected) - ignorable
                        if not _IGNORED_HF_TENSOR.match(n))
    if unexpected:
        raise ConversionError(f"{reader.folder}: tensor(s) this architecture does not use "
                              f"(they would be lost): {', '.join(unexpected[:5])}"
                              + (" ..." if len(unexpected) > 5 else ""))


class _MegatronStateDict(Mapping):
    """megatron's TP=1, PP=1 state dict, each tensor fused from the Hugging Face tensors on
    access, so that ``load_full_state_dict`` streams: one tensor in memory at a time."""

    def __init__(self, reader: SafetensorsCheckpoint, cfg: GPTConfig):
        self._reader, self._cfg = reader, cfg
        self._maps = {m.mcore: m for m in tensor_maps(cfg)}

    def __getitem__(self, key: str) -> torch.Tensor:
        m = self._maps[key]
        tensors = [self._reader.get(name) for name in m.hf]
        dtype = getattr(torch, self._cfg.dtype)
        for name, tensor in zip(m.hf, tensors):
            # As the checkpoint will hold it: a value beyond fp16's range becomes inf there.
            check_finite(tensor.to(dtype), f"tensor {name} in {self._reader.file(name)}"
                         + ("" if tensor.dtype == dtype else f" cast to {self._cfg.dtype}"))
        return fuse(m.kind, tensors, self._cfg)

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


# ------------------------------------------------------------------------------ hf-to-mcore


def _convert_rank(weights: str, cfg: GPTConfig, tp: int, pp: int, staging: str) -> None:
    """One shard process: build this rank's part of the model, fill it, save collectively."""
    from nemo_anchored.checkpoint.sharded import save_checkpoint
    from nemo_anchored.models.gpt import build_gpt_model, load_full_state_dict
    from nemo_anchored.parallel.distributed import init_model_parallel, shutdown

    init_model_parallel(tp, pp, seed=0)
    # No random initialisation: load_full_state_dict writes every weight.
    model = build_gpt_model(cfg, use_transformer_engine=False, initialize=False)
    load_full_state_dict(model, _MegatronStateDict(SafetensorsCheckpoint(weights), cfg))
    save_checkpoint(staging, model=model)
    shutdown()


def _write_gguf_weights(hf_path: Path, gguf_file: str, hf_config, cfg: GPTConfig,
                        folder: Path) -> None:
    """Dequantize the GGUF model (all of it in memory: transformers has no streaming GGUF
    reader) and write the tensors ``cfg`` needs to ``folder/model.safetensors``."""
    transformers = transformers_offline()
    # The config already read: each GGUF read parses the whole metadata (seconds).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_path), gguf_file=gguf_file, config=hf_config, dtype=torch.float32)
    state = model.state_dict()
    missing = [name for name in hf_shapes(cfg) if name not in state]
    if missing:
        raise ConversionError(f"{hf_path}/{gguf_file}: tensor(s) missing: {', '.join(missing)}")
    folder.mkdir(parents=True)
    save_file({name: state[name].contiguous() for name in hf_shapes(cfg)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def _checkpoint_dtype(reader: SafetensorsCheckpoint) -> str:
    return _SAFETENSORS_DTYPES[reader.dtype("model.embed_tokens.weight")]


def _add_legacy_rope_keys(config_path: Path) -> None:
    """transformers >= 5 writes the RoPE settings only as ``rope_parameters``; older versions
    (an lm-evaluation-harness environment, say) read ``rope_theta`` / ``rope_scaling`` and
    would silently use their defaults. transformers 5 loads both forms alike."""
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling",
                              {k: v for k, v in rope.items() if k != "rope_theta"})
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_hf_side(hf_path: Path, gguf_file: Optional[str], hf_config, tokenizer,
                  staging: Path) -> None:
    """The configs export needs (DIR/hf) and the tokenizer (DIR/tokenizer)."""
    hf_dir = staging / HF_SUBDIR
    hf_dir.mkdir()
    if gguf_file is None:
        # Verbatim: the exported config.json is then exactly the one the model came with.
        for name in ("config.json", "generation_config.json"):
            if (hf_path / name).is_file():
                shutil.copy2(hf_path / name, hf_dir / name)
    else:
        hf_config.architectures = [ARCHITECTURES[hf_config.model_type]]
        hf_config.save_pretrained(str(hf_dir))
        _add_legacy_rope_keys(hf_dir / "config.json")
        generation = transformers_offline().GenerationConfig.from_model_config(hf_config)
        generation.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(staging / TOKENIZER_SUBDIR))


def model_yaml(cfg: GPTConfig, base_checkpoint: Path) -> str:
    """The ``model:`` section and ``data.tokenizer`` of a recipe for the converted model; also
    a config `nemo-anchored eval --config` takes as it is."""
    import yaml

    section = {**asdict(cfg), "base_checkpoint": str(base_checkpoint)}
    header = ("# The model section and tokenizer for a nemo-anchored recipe (written by "
              "`nemo-anchored convert hf-to-mcore`).\n")
    return header + yaml.safe_dump({"model": section, "data": {
        "tokenizer": str(base_checkpoint / TOKENIZER_SUBDIR)}}, sort_keys=False)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def convert_hf_to_mcore(hf_path, out, *, tp: int = 1, pp: int = 1,
                        gguf_file: Optional[str] = None, dtype: Optional[str] = None,
                        make_vocab_size_divisible_by: int = 128) -> Path:
    """Convert the Hugging Face model folder ``hf_path`` into the nemo-anchored directory
    ``out`` (see the module docstring), with ``tp * pp`` shard processes. ``dtype`` (float32,
    bfloat16, float16) defaults to the checkpoint's (float32 for GGUF). Returns ``out``.

    The shard processes are started with the ``spawn`` method, which re-imports the calling
    script: call this from a script only under ``if __name__ == "__main__":``."""
    hf_path, out = Path(hf_path), Path(out).absolute()
    if not hf_path.is_dir():
        raise ConversionError(f"--hf {hf_path}: not a directory")
    if out.exists():
        raise ConversionError(f"--out {out} already exists; remove it or choose another")
    hf_config = load_hf_config(hf_path, gguf_file)
    source = f"{hf_path}/{gguf_file}" if gguf_file else f"{hf_path}/config.json"
    cfg = gpt_config_from_hf(hf_config, dtype=dtype or "float32",
                             make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    try:
        check_layout(cfg, tp, pp, tp_key="--tp", pp_key="--pp")
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    transformers = transformers_offline()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_path), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"{source}: no Hugging Face tokenizer can be loaded: {err}") from err

    staging = out.with_name(out.name + _STAGING_SUFFIX)
    gguf_weights = out.with_name(out.name + _GGUF_WEIGHTS_SUFFIX)
    _remove(staging, tmp_path(staging), gguf_weights)  # leftovers of a conversion that died
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        weights = hf_path
        if gguf_file is not None:
            _write_gguf_weights(hf_path, gguf_file, hf_config, cfg, gguf_weights)
            weights = gguf_weights
        reader = SafetensorsCheckpoint(weights)
        check_hf_tensors(reader, cfg, source)
        if dtype is None and gguf_file is None:
            cfg = replace(cfg, dtype=_checkpoint_dtype(reader))
        del reader
        try:
            run_local_world(_convert_rank, tp * pp, (str(weights), cfg, tp, pp, str(staging)))
        except LocalWorldError as err:
            raise ConversionError(f"converting {source} failed:\n{err}") from None
        with amend(staging, out):
            _save_hf_side(hf_path, gguf_file, hf_config, tokenizer, staging)
            write_text(staging / MODEL_YAML, model_yaml(cfg, out))
    except BaseException:
        _remove(staging, tmp_path(staging))
        raise
    finally:
        _remove(gguf_weights)
    return out
