"""The forgetting lab's settings: the methods it compares, how each runs on the trainer, and the
quick (default), demo (`make demo`) and full settings."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from nemo_anchored.config import SHIPPED_RECIPES
from nemo_anchored.lab.budget import check_budgets

ROOT = Path(__file__).resolve().parents[2]
RECIPE = SHIPPED_RECIPES / "lab_tiny.yaml"
# The committed bases (lab/base.py): the lab starts from the one pretrained with its settings.
COMMITTED_BASES = (ROOT / "assets" / "lab_base", ROOT / "assets" / "lab_base_full")
SUMMARY_METHODS = ("base", "sft", "low_sft", "kl_sft", "dft", "stm", "anchored_logit",
                   "anchored_prob", "anchored_live")
LAB_METHODS = SUMMARY_METHODS[1:]
# The authors' public code, per anchored variant: (reference epochs, T, K). KDFlow 3.0 (live
# anchor) trains 5 epochs where its reference gets 1; 2.0 (snapshot) T = 5 x K = 5 where its
# reference gets 3. Live runs as one outer iteration, as theirs does (no optimizer restarts).
AUTHORS_BUDGETS = {"anchored_live": (1, 1, 5), "anchored_logit": (3, 5, 5),
                   "anchored_prob": (3, 5, 5)}

# Trainer overrides per lab method (the anchored variants share the trainer's `anchored`).
METHOD_OVERRIDES = {
    "sft": ["method=sft"],
    "low_sft": ["method=low_sft"],
    "kl_sft": ["method=kl_sft"],
    "dft": ["method=dft"],
    "stm": ["method=stm"],
    "anchored_logit": ["method=anchored", "anchor.interpolation=logit", "anchor.mode=snapshot"],
    "anchored_prob": ["method=anchored", "anchor.interpolation=prob", "anchor.mode=snapshot"],
    "anchored_live": ["method=anchored", "anchor.interpolation=logit", "anchor.mode=live"],
}


@dataclasses.dataclass
class LabSettings:
    """Everything that defines a lab run (recorded in results.json under "config")."""

    seeds: int = 3
    # Only these of the seeds (0-based) run: one shard of a lab split over machines or sessions;
    # `nemo-anchored lab --merge` joins the shards' results (lab/shards.py). None: every seed.
    seed_indices: Optional[Sequence[int]] = None
    methods: Sequence[str] = LAB_METHODS
    # data
    general_train: int = 3000
    general_eval: int = 200
    domain_train: int = 1024  # x epochs / batch 32 = 128 fine-tuning steps in the quick setting
    domain_eval: int = 200
    data_seed: int = 0
    # p_base: pretraining on the general mix
    pretrain_epochs: int = 10
    pretrain_lr: float = 3e-3
    pretrain_warmup_steps: int = 20
    # fine-tuning: the data budget is `epochs` passes over D for every method
    epochs: int = 4
    # sft, kl_sft, dft, stm, anchored_*: on the quick setting SFT barely moves the domain at
    # 3e-5 (held-out ~0.05, base ~0.0), is half-way at 3e-4 and learns it (~0.8-0.9) at 1e-3.
    # 3e-3 was added after the first 3-seed run, in which anchored (logit) ended at 0.770, just
    # under the matched-domain bar (0.774) at the top of the grid: a grid that stops where a
    # method is still climbing cannot place it on the matched-domain axis (README, results).
    lrs: Sequence[float] = (3e-5, 3e-4, 1e-3, 3e-3)
    low_lrs: Sequence[float] = (1e-5, 3e-5, 1e-4)  # low_sft: the sft objective, lower lrs
    reference_lr: float = 1e-3  # the SFT setting of the reference (must be in `lrs` to reuse)
    # anchored, the equal arm: T outer iterations x K inner epochs = `epochs`
    outer_iterations: int = 2
    inner_epochs: int = 2
    alphas: Sequence[float] = (0.5,)  # every anchored point at each (the alpha sweep)
    # The budget arms (lab/budget.py): "equal"; "authors" and "control" together
    budgets: Sequence[str] = ("equal",)
    authors_budgets: Mapping[str, Sequence[int]] = dataclasses.field(
        default_factory=lambda: dict(AUTHORS_BUDGETS))
    # The control arm's grid reaches 1e-5: at 5-25 epochs the equal arm's lrs overshoot, and a
    # baseline given the anchored arm's epochs must be able to train gently.
    control_lrs: Sequence[float] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    kl_lambda: float = 0.2
    stm_threshold: float = 2.5
    max_new_tokens: int = 8
    model_overrides: Sequence[str] = ()  # e.g. ("model.num_layers=4",)
    keep_checkpoints: bool = False  # False: delete each run's step checkpoints (final stays)
    # An existing p_base checkpoint (e.g. OUT/runs/pretrain/final of an earlier lab with the
    # same model and data settings): skips the pretraining.
    base_checkpoint: Optional[str] = None

    def seed_values(self) -> List[int]:
        """The fine-tuning seeds this lab runs (trainer.seed), in the whole lab's order."""
        indices = range(self.seeds) if self.seed_indices is None else sorted(self.seed_indices)
        return [1000 + i for i in indices]

    def check(self) -> None:
        unknown = set(self.methods) - set(LAB_METHODS)
        if unknown:
            raise ValueError(f"unknown lab method(s) {sorted(unknown)}; known: {LAB_METHODS}")
        check_budgets(self)
        if "sft" not in self.methods:
            raise ValueError("methods must include sft (the matched-domain rule uses its curve)")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if self.seed_indices is not None:
            indices = list(self.seed_indices)
            if not indices or len(set(indices)) != len(indices) \
                    or not all(0 <= i < self.seeds for i in indices):
                raise ValueError(f"seed_indices {indices}: distinct indices of the {self.seeds} "
                                 f"seeds, each in 0..{self.seeds - 1}")


QUICK = LabSettings()
# `make demo`: the quick lab's data, model, base and lr grids with fewer methods and seeds, so it
# ends within a few minutes on 2 CPU cores.
DEMO = dataclasses.replace(QUICK, seeds=2, methods=("sft", "low_sft", "kl_sft", "anchored_logit",
                                                    "anchored_live"))
FULL = LabSettings(general_train=3400, general_eval=400, domain_train=1024, domain_eval=400,
                   pretrain_epochs=30, epochs=6, outer_iterations=3, inner_epochs=2,
                   lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3), low_lrs=(3e-6, 1e-5, 3e-5),
                   reference_lr=1e-3, alphas=(0.2, 0.5, 0.8),
                   budgets=("equal", "authors", "control"),
                   control_lrs=(3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
                   model_overrides=("model.num_layers=4", "model.hidden_size=128",
                                    "model.ffn_hidden_size=384"))
