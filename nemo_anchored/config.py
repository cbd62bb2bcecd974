"""Run configuration: NeMo-shaped YAML recipes, command-line overrides, validation.

A recipe has the sections trainer, model, parallelism, data, optim, anchor, baselines,
logging and checkpoint (see recipes/tiny_cpu.yaml). ``load_config`` merges a recipe with
``key=value`` overrides onto the typed schema below and validates it, all before any process
group starts, so a mistake costs one clear message naming the key, not a cluster allocation.

``--config`` takes a recipe file or the name of a recipe shipped in the package (``tiny_cpu``,
see ``nemo_anchored/recipes/``). Relative paths, one rule each:

- an input written in a recipe (``INPUT_PATH_KEYS``) is relative to the recipe's folder, so a
  recipe and its data can move together and be used from anywhere; ``${cwd:}`` in a recipe
  stands for the working directory, for inputs made where the commands run (a conversion's
  output, built data);
- an input given on the command line (``key=value``) is relative to the working directory, as
  any path typed in a shell;
- outputs (logging.dir, checkpoint.dir) are relative to the working directory: a run writes
  where it is started.

The loaded config holds every input path absolute, so a run's config.yaml works from anywhere.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_anchored.checkpoint.format import CheckpointError, read_marker
from nemo_anchored.errors import UserError

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype and conversion --dtype

SHIPPED_RECIPES = Path(__file__).parent / "recipes"  # `--config NAME` (package data)
# Input paths (see the module docstring); a value in _NOT_A_PATH is a keyword instead.
INPUT_PATH_KEYS = ("data.train_path", "data.valid_path", "data.tokenizer",
                   "model.base_checkpoint", "model.reference_checkpoint", "checkpoint.resume")
_NOT_A_PATH = {"data.tokenizer": ("byte",), "checkpoint.resume": ("auto", "none")}
# Appended to a missing input's message, whose path is already absolute (load_config).
_RELATIVE = (" (a relative path in a recipe is relative to the recipe's folder; on the command "
             "line, to the working directory)")
# The keys only training reads: with ``training=False`` (eval) they may be unset, as in a
# conversion's model.yaml; these stand-ins keep the interpolations and checks working.
_TRAINING_ONLY = {"name": "no_training", "data": {"train_path": "unused",
                                                  "seq_length": "${model.max_seq_len}"}}
OmegaConf.register_resolver("cwd", os.getcwd, replace=True)  # ${cwd:} (module docstring)

METHODS = ("sft", "low_sft", "kl_sft", "dft", "stm", "anchored")
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")  # model.attention
RECOMPUTE_GRANULARITIES = ("selective", "full")  # model.recompute (null: none)
RECOMPUTE_METHODS = ("uniform", "block")  # model.recompute_method
SFT_METHODS = METHODS[:-1]  # run by `nemo-anchored sft`; `anchored` by `nemo-anchored anchor`


class ConfigError(ValueError, UserError):
    """A configuration problem, with the offending key in the message."""


@dataclass
class TrainerConfig:
    seed: int = 1234
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward pass on one rank
    epochs: int = 1  # SFT-stage methods: passes over the data set
    max_steps: Optional[int] = None  # SFT-stage methods: stop after this many steps instead
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # Stop when the gradient norm has been exactly 0 for this many consecutive steps (a model
    # collapsed to a constant output by a too-high learning rate learns nothing more); 0: never.
    stop_on_collapse_steps: int = 20
    # Validation (data.valid_path or data.valid_fraction) every this many steps and after the
    # last one; 0: after the last step only. Needs a validation set when > 0.
    eval_interval: int = 0


@dataclass
class GPTConfig:
    """Architecture of a decoder-only, Llama-style transformer (RoPE, RMSNorm, SwiGLU): the
    ``model:`` keys of a recipe that the model builder reads (nemo_anchored.models.gpt)."""

    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    vocab_size: int = MISSING
    max_seq_len: int = MISSING
    num_query_groups: Optional[int] = None  # None: multi-head attention (one group per head)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    tie_embeddings: bool = True
    add_qkv_bias: bool = False
    rotary_base: float = 10000.0
    # Llama 3.1/3.2 RoPE frequency scaling (megatron-core fixes low_freq_factor=1,
    # high_freq_factor=4, original_max_position_embeddings=8192; only the factor varies).
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: str = "float32"  # float32 | bfloat16 | float16
    make_vocab_size_divisible_by: int = 128
    # Core attention (docs/design/parallel_layout.md#attention-and-recomputation): te
    # (Transformer Engine's layer spec) | sdpa (megatron's local spec with PyTorch's fused
    # attention kernels) | local (megatron's own DotProductAttention, which materialises the
    # [b, heads, s, s] scores) | auto (te when Transformer Engine imports, sdpa otherwise).
    # No weights of their own: checkpoints are the same whichever is used.
    attention: str = "auto"
    # Activation recomputation, megatron's granularities: null (none) | selective (the core
    # attention: pays with local, whose scores it drops) | full (whole layers, with
    # recompute_method uniform: chunks of recompute_num_layers layers, each keeping only its
    # input; block: the first recompute_num_layers layers of each pipeline stage).
    recompute: Optional[str] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1

    @classmethod
    def of(cls, model_section) -> "GPTConfig":
        """The architecture in a recipe's ``model`` section (a ModelConfig or a DictConfig)."""
        return cls(**{f.name: model_section[f.name] for f in fields(cls)})

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by``, whatever
        the TP size (which must divide it).

        megatron-core's training scripts pad to a multiple of ``divisible_by * TP`` instead,
        which gives every TP size its own embedding shape; a layout-independent padding keeps
        checkpoints loadable at any TP.
        """
        divisor = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // divisor) * divisor

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


def check_layout(arch: GPTConfig, tp: int, pp: int, *, tp_key: str, pp_key: str) -> None:
    """The TP x PP layouts a model can be split into; ``ConfigError`` naming ``tp_key`` or
    ``pp_key`` (the recipe key or command-line flag the sizes came from) otherwise."""
    _require(tp >= 1, tp_key, "must be >= 1")
    _require(pp >= 1, pp_key, "must be >= 1")
    groups = arch.query_groups
    _require(groups % tp == 0, tp_key, f"TP={tp} must divide the query groups ({groups}) and "
             f"heads ({arch.num_attention_heads})")
    padded = arch.padded_vocab_size
    _require(padded % tp == 0, tp_key, f"TP={tp} must divide the padded vocabulary ({padded} = "
             f"model.vocab_size rounded up to model.make_vocab_size_divisible_by="
             f"{arch.make_vocab_size_divisible_by})")
    _require(arch.num_layers % pp == 0, pp_key,
             f"PP={pp} must divide model.num_layers={arch.num_layers}")
    if arch.recompute == "full":
        per_stage = arch.num_layers // pp
        n = arch.recompute_num_layers
        _require(1 <= n <= per_stage, "model.recompute_num_layers",
                 f"{n} must be in [1, the {per_stage} layers of a pipeline stage]")
        # uniform recomputes the stage in chunks of n layers: a partial last chunk is refused
        # by nothing in megatron, which then indexes past the stage's layers.
        _require(arch.recompute_method != "uniform" or per_stage % n == 0,
                 "model.recompute_num_layers", f"{n} must divide the {per_stage} layers of a "
                 "pipeline stage with model.recompute_method=uniform")


@dataclass
class ModelConfig(GPTConfig):
    """The architecture and where the weights come from."""

    # A nemo-anchored checkpoint directory with the base weights (p_base); None: initialise
    # from trainer.seed (tiny recipes only).
    base_checkpoint: Optional[str] = None
    # The frozen SFT reference for kl_sft and anchored: the final checkpoint of an sft run.
    reference_checkpoint: Optional[str] = None


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    sequence_parallel: bool = False  # needs Transformer Engine (GPU machines)
    # A collective that waits longer than this for a peer (a dead or hung node) stops the run
    # with an error instead of hanging; must exceed the longest legitimate wait after start-up
    # (a checkpoint save or load while the other ranks wait).
    collective_timeout_s: float = 600.0
    # How long the ranks wait for each other to start (the process group's rendezvous and the
    # parallel groups): a rank's imports, device and data set-up may lag its peers' by minutes.
    # (Under torchrun the nodes' agents meet first, within their own rendezvous timeout.)
    startup_timeout_s: float = 1800.0


@dataclass
class DataConfig:
    # JSONL, one example a line: {"messages": [{"role", "content"}, ...]} (system | user |
    # assistant; the loss covers the assistant turns) or {"prompt": ..., "response": ...}
    train_path: str = MISSING
    # byte (UTF-8 bytes plus special tokens) | a Hugging Face tokenizer folder (the model's
    # own tokenizer and chat template, loaded offline)
    tokenizer: str = "byte"
    seq_length: int = MISSING  # tokens per training sequence (padded or truncated to it)
    on_error: str = "raise"  # malformed line: raise | skip (skips are counted and reported)
    overlong: str = "truncate"  # sequence over seq_length: truncate | drop | raise
    # Pack several examples into each seq_length row (first-fit decreasing), each attending to
    # itself only, with its own positions (docs/design/packing.md); the trainer's batch sizes
    # then count rows. false: one example per row, padded.
    packing: bool = False
    shuffle: bool = True
    # Tokenized data, reused by every rank and later run (docs/design/data_cache.md); on a file
    # system all nodes share. null: every rank tokenizes the data itself, nothing is stored.
    cache_dir: Optional[str] = "~/.cache/nemo_anchored/data"
    # A validation set (training/validation.py): a JSONL file like train_path, or this fraction
    # of train_path's examples held out of training (chosen by trainer.seed). null: none.
    valid_path: Optional[str] = None
    valid_fraction: Optional[float] = None


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    decay_style: str = "constant"  # constant | linear | cosine


@dataclass
class AnchorConfig:
    alpha: float = 0.5
    interpolation: str = "logit"  # logit | prob
    mode: str = "snapshot"  # snapshot (Algorithm 1: three models) | live (two models)
    outer_iterations: int = 5  # T
    inner_epochs: int = 5  # K: epochs over the data per outer iteration...
    inner_steps: Optional[int] = None  # ...or N optimizer steps (overrides inner_epochs)
    # Each outer iteration is a fresh projection onto a new anchor: new optimizer state and
    # learning-rate schedule. False keeps both across outer iterations.
    restart_optimizer: bool = True
    temperature: float = 1.0
    backend: str = "auto"  # auto | fused | torch (nemo_anchored.ops.anchored_kl)


@dataclass
class BaselinesConfig:
    kl_lambda: float = 0.2  # kl_sft: CE + lambda * KL(p_theta || p_ref)
    stm_threshold: float = 2.5  # stm: drop response tokens whose base perplexity exceeds it
    # The SFT-stage losses' kernels: auto | fused | torch (nemo_anchored.ops.sharded_losses)
    backend: str = "auto"


@dataclass
class WandbConfig:
    """Weights & Biases, beside TensorBoard (training/trackers.py; needs `pip install wandb`)."""

    enabled: bool = False
    project: str = "nemo-anchored"
    entity: Optional[str] = None  # team or user; null: the account's default
    name: str = "${name}"  # the W&B run's name
    mode: str = "offline"  # offline (files under dir; `wandb sync` uploads them) | online
    dir: str = "${logging.dir}"  # W&B writes DIR/wandb/


@dataclass
class MlflowConfig:
    """MLflow, beside TensorBoard (training/trackers.py; needs `pip install mlflow-skinny`)."""

    enabled: bool = False
    # A tracking server (http://...), or a local folder (file:..., offline, no server)
    tracking_uri: str = "file:${logging.dir}/mlruns"
    experiment: str = "nemo-anchored"
    run_name: str = "${name}"


@dataclass
class LoggingConfig:
    dir: str = "runs/${name}"
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    # Trust-region diagnostic and KL(p_theta || p_ref) (extra passes over the logits) every N
    # steps; 0: never. kl_sft always logs its KL term.
    diagnostics_every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class CheckpointConfig:
    dir: str = "${logging.dir}/checkpoints"
    save_every: int = 0  # steps; 0: only at outer-iteration ends and at the end
    resume: str = "auto"  # auto: latest complete checkpoint in dir if any | none | a path
    # A resume whose RESUME_SETTINGS (training/resume.py) differ from the checkpoint's is
    # refused (the data or the updates would change silently); true: resume anyway, warning.
    allow_changed_settings: bool = False


@dataclass
class RunConfig:
    name: str = MISSING
    method: str = "sft"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def load_config(recipe: str | os.PathLike, overrides: List[str] = (), *, world_size: int = 1,
                check_paths: bool = True, training: bool = True) -> DictConfig:
    """Recipe (a file or a shipped recipe's name) + ``key=value`` overrides -> a validated,
    resolved, read-only config, its input paths absolute (module docstring).

    Unknown keys and wrong types are reported by OmegaConf against the schema; the checks in
    ``validate`` cover values and their combinations. ``world_size`` is the number of processes
    that will run (torchrun's WORLD_SIZE), for the parallel-layout checks. ``training=False``:
    for a command that builds the model but trains nothing (eval), which also takes a
    conversion's model.yaml; the training-only keys may then be unset.
    """
    path = find_recipe(recipe)
    recipe_cfg = read_recipe(path)
    layers = [OmegaConf.structured(RunConfig)] + ([] if training else [_TRAINING_ONLY])
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
        cfg = OmegaConf.merge(*layers, recipe_cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as error:
        raise ConfigError(_omegaconf_message(error, path)) from None
    if missing:
        raise ConfigError(f"{path}: required key(s) not set: {', '.join(missing)}")
    given = {item.split("=", 1)[0] for item in overrides}
    for key in INPUT_PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in _NOT_A_PATH.get(key, ()):
            folder = Path.cwd() if key in given else path.parent.absolute()
            OmegaConf.update(cfg, key, str(folder / Path(value).expanduser()))
    validate(cfg, world_size=world_size, check_paths=check_paths)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def find_recipe(recipe: str | os.PathLike) -> Path:
    """The recipe file ``--config`` names: a path, else the name of a shipped recipe (with or
    without .yaml); ConfigError saying where it looked otherwise."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = SHIPPED_RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.name == str(recipe) and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))
    raise ConfigError(f"--config: {str(path)!r} is neither a recipe file (looked in "
                      f"{Path.cwd()}) nor a shipped recipe ({', '.join(names)})")


def read_recipe(recipe: str | os.PathLike) -> DictConfig:
    """The recipe file as written (no schema, no overrides), found by ``find_recipe``;
    ConfigError naming the file when it is missing, unreadable, not YAML (with the line and
    column) or not a mapping of sections.
    """
    path = find_recipe(recipe)
    try:
        recipe_cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:  # a syntax error: where it was found (0-based)
        mark = error.problem_mark
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: "
                          f"{error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:  # characters YAML does not take
        raise ConfigError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    except OSError as error:  # also OmegaConf's answer to a scalar at the top level
        reason = error.strerror or error
        raise ConfigError(f"{path}: cannot be read as a recipe: {reason}") from None
    except OmegaConfBaseException as error:  # e.g. a malformed ${...} interpolation
        raise ConfigError(_omegaconf_message(error, path)) from None
    if not isinstance(recipe_cfg, DictConfig):  # OmegaConf.load's other answer: ListConfig
        raise ConfigError(f"{path}: the top level is a list, not a mapping of sections "
                          f"(trainer:, model:, data:, ...)")
    return recipe_cfg


def _omegaconf_message(error: OmegaConfBaseException, path: Path) -> str:
    key = getattr(error, "full_key", None)
    text = str(error).splitlines()[0]
    return f"{path}: {key}: {text}" if key else f"{path}: {text}"


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _positive(value: float) -> bool:
    """> 0 and finite (inf passes a plain > 0)."""
    return 0 < value < math.inf


def _one_of(value: Any, key: str, allowed) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig, *, world_size: int = 1, check_paths: bool = True) -> None:
    """Value and consistency checks; raises ConfigError naming the key and what is allowed."""
    _one_of(cfg.method, "method", METHODS)
    t, m, p, d, o, a = cfg.trainer, cfg.model, cfg.parallelism, cfg.data, cfg.optim, cfg.anchor

    _one_of(t.device, "trainer.device", ("auto", "cpu", "cuda"))
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
    _require(t.epochs >= 1, "trainer.epochs", "must be >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", "must be >= 1 or null")
    _require(t.stop_on_collapse_steps >= 0, "trainer.stop_on_collapse_steps",
             "must be >= 0 (0 disables the check)")

    _require(0 <= t.seed < 2**32, "trainer.seed", f"{t.seed} is outside [0, 2**32)")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_len",
                "make_vocab_size_divisible_by"):
        _require(m[key] >= 1, f"model.{key}", "must be >= 1")
    for key in ("num_query_groups", "ffn_hidden_size", "kv_channels"):
        _require(m[key] is None or m[key] >= 1, f"model.{key}", "must be >= 1 or null")
    for key in ("rotary_base", "norm_epsilon"):
        _require(_positive(m[key]), f"model.{key}", "must be > 0 and finite")
    _require(0 <= m.init_method_std < math.inf, "model.init_method_std",
             "must be >= 0 and finite")
    _one_of(m.dtype, "model.dtype", MODEL_DTYPES)
    arch = GPTConfig.of(m)
    groups = arch.query_groups
    _require(m.num_attention_heads % groups == 0, "model.num_query_groups",
             f"{groups} does not divide num_attention_heads={m.num_attention_heads}")
    _require(m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0,
             "model.hidden_size", f"{m.hidden_size} is not divisible by num_attention_heads="
             f"{m.num_attention_heads} (or set model.kv_channels)")
    _require(not m.rope_scaling or m.rope_scaling_factor >= 1, "model.rope_scaling_factor",
             f"{m.rope_scaling_factor} must be >= 1 (it divides the low RoPE frequencies)")
    _require(0 <= m.hidden_dropout < 1, "model.hidden_dropout", "must be in [0, 1)")
    _require(0 <= m.attention_dropout < 1, "model.attention_dropout", "must be in [0, 1)")
    _one_of(m.attention, "model.attention", ATTENTION_BACKENDS)
    _one_of(m.recompute, "model.recompute", (None, *RECOMPUTE_GRANULARITIES))
    _one_of(m.recompute_method, "model.recompute_method", RECOMPUTE_METHODS)

    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    check_layout(arch, tp, pp, tp_key="parallelism.tensor_model_parallel_size",
                 pp_key="parallelism.pipeline_model_parallel_size")
    _require(not p.sequence_parallel or tp > 1, "parallelism.sequence_parallel",
             "needs tensor_model_parallel_size > 1")
    _require(not p.sequence_parallel or m.attention in ("auto", "te"),
             "parallelism.sequence_parallel", f"needs Transformer Engine's layer spec "
             f"(model.attention=te or auto), not model.attention={m.attention}: megatron's "
             "local norms refuse sequence parallelism")
    _require(_positive(p.collective_timeout_s), "parallelism.collective_timeout_s",
             "must be > 0 and finite")
    _require(_positive(p.startup_timeout_s), "parallelism.startup_timeout_s",
             "must be > 0 and finite")
    _require(world_size % (tp * pp) == 0, "parallelism",
             f"TP={tp} x PP={pp} does not divide the {world_size} processes")
    dp = world_size // (tp * pp)
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size >= per_step and t.global_batch_size % per_step == 0,
             "trainer.global_batch_size", f"{t.global_batch_size} must be a multiple of "
             f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")

    _require(d.tokenizer == "byte" or not check_paths or Path(d.tokenizer).is_dir(),
             "data.tokenizer", f"{d.tokenizer!r} is neither 'byte' nor a Hugging Face "
             f"tokenizer folder{_RELATIVE}")
    _one_of(d.on_error, "data.on_error", ("raise", "skip"))
    _one_of(d.overlong, "data.overlong", ("truncate", "drop", "raise"))
    _require(2 <= d.seq_length <= m.max_seq_len, "data.seq_length",
             f"{d.seq_length} must be in [2, model.max_seq_len={m.max_seq_len}]")

    _one_of(o.name, "optim.name", ("adamw", "sgd"))
    _require(o.name == "adamw" or not p.use_distributed_optimizer,
             "parallelism.use_distributed_optimizer",
             f"megatron's distributed optimizer supports only optim.name=adamw, not {o.name}")
    _require(_positive(o.lr), "optim.lr", "must be > 0 and finite")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1/adam_beta2",
             "must be in [0, 1)")
    _require(_positive(o.adam_eps), "optim.adam_eps", "must be > 0 and finite")
    _require(0 <= o.sgd_momentum < 1, "optim.sgd_momentum", "must be in [0, 1)")
    _require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _one_of(o.decay_style, "optim.decay_style", ("constant", "linear", "cosine"))

    _require(0 < a.alpha <= 1, "anchor.alpha", f"{a.alpha} is outside (0, 1]")
    _one_of(a.interpolation, "anchor.interpolation", ("logit", "prob"))
    _one_of(a.mode, "anchor.mode", ("snapshot", "live"))
    _require(a.outer_iterations >= 1, "anchor.outer_iterations", "must be >= 1")
    _require(a.inner_epochs >= 1, "anchor.inner_epochs", "must be >= 1")
    _require(a.inner_steps is None or a.inner_steps >= 1, "anchor.inner_steps",
             "must be >= 1 or null")
    _require(_positive(a.temperature), "anchor.temperature", "must be > 0 and finite")
    _one_of(a.backend, "anchor.backend", ("auto", "fused", "torch"))
    _one_of(cfg.baselines.backend, "baselines.backend", ("auto", "fused", "torch"))
    _require(cfg.baselines.kl_lambda >= 0, "baselines.kl_lambda", "must be >= 0")
    _require(cfg.baselines.stm_threshold > 1, "baselines.stm_threshold",
             "must be > 1 (a perplexity)")
    _require(cfg.logging.diagnostics_every >= 0, "logging.diagnostics_every", "must be >= 0")
    _one_of(cfg.logging.wandb.mode, "logging.wandb.mode", ("offline", "online"))
    _require(t.eval_interval >= 0, "trainer.eval_interval",
             "must be >= 0 (0: validate after the last step only)")
    _require(d.valid_path is None or d.valid_fraction is None, "data.valid_path/valid_fraction",
             "set one of them, not both")
    _require(d.valid_fraction is None or 0 < d.valid_fraction < 1, "data.valid_fraction",
             f"{d.valid_fraction} is outside (0, 1)")
    _require(t.eval_interval == 0 or d.valid_path is not None or d.valid_fraction is not None,
             "trainer.eval_interval", f"{t.eval_interval} needs a validation set: "
             "data.valid_path or data.valid_fraction")
    _require(cfg.checkpoint.save_every >= 0, "checkpoint.save_every", "must be >= 0")

    needs_reference = cfg.method in ("kl_sft", "anchored")
    _require(not needs_reference or m.reference_checkpoint is not None,
             "model.reference_checkpoint", f"method {cfg.method} needs the SFT reference "
             "(the final checkpoint of an sft run)")
    if check_paths:
        _require(Path(d.train_path).is_file(), "data.train_path",
                 f"{d.train_path!r} does not exist{_RELATIVE}")
        _require(d.valid_path is None or Path(d.valid_path).is_file(), "data.valid_path",
                 f"{d.valid_path!r} does not exist{_RELATIVE}")
        checkpoints = ["base_checkpoint"] + (["reference_checkpoint"] if needs_reference else [])
        for key in checkpoints:
            value = m[key]
            _require(value is None or Path(value).is_dir(), f"model.{key}",
                     f"{value!r} is not a checkpoint directory{_RELATIVE}")
            _require_complete(f"model.{key}", value)
        resume = cfg.checkpoint.resume
        if resume not in ("auto", "none"):
            _require(Path(resume).is_dir(), "checkpoint.resume",
                     f"{resume!r} is not a checkpoint directory (or use auto | none){_RELATIVE}")
            _require_complete("checkpoint.resume", resume)
        if cfg.method == "anchored":
            _require_trained_reference(m)


def _require_complete(key: str, checkpoint: Optional[str]) -> None:
    """ConfigError naming ``key`` when ``checkpoint`` is no complete checkpoint (read_marker's
    reason): before any process group starts, not at the load."""
    if checkpoint is None:
        return
    try:
        read_marker(checkpoint)
    except CheckpointError as error:
        raise ConfigError(f"{key}: {error}") from None


def _require_trained_reference(m) -> None:
    """Anchored Learning toward the base trains nothing: the anchor target equals the policy
    from the first step, so the loss is 0 and the policy never moves. Refused when the
    reference is the base's own folder, or a run's initial weights (the step-0 checkpoint
    RUN_DIR/base that a seed-initialised run keeps)."""
    key, reference, base = "model.reference_checkpoint", Path(m.reference_checkpoint), \
        m.base_checkpoint
    use = "use the final checkpoint of an sft run (RUN_DIR/final)"
    _require(base is None or reference.resolve() != Path(base).resolve(), key,
             f"{str(reference)!r} is model.base_checkpoint: training toward the base trains "
             f"nothing (the loss is 0 from the start); {use}")
    step = read_marker(reference).get("global_step")  # complete: _require_complete checked it
    _require(step != 0, key, f"{str(reference)!r} is a step-0 checkpoint (a run's initial "
             f"weights, RUN_DIR/base), not a trained reference: training toward it trains "
             f"nothing; {use}")
