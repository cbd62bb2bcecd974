"""The lab's budget arms (which trainings each point of the sweep is) and the compute each point
costs.

Arms (LabSettings.budgets):

    equal    every method gets `epochs` passes over D; anchored: T x K = epochs; the SFT
             reference (kl_sft and anchored depend on it) is sft at reference_lr, `epochs`
    authors  the anchored variants at the authors' budgets (LabSettings.authors_budgets: live 5
             epochs where its reference gets 1; snapshot T = 5 x K = 5 where its reference gets
             3), each against a reference trained for that many epochs; the SFT-family
             baselines keep their own epochs, so they are the equal arm's points
    control  sft and kl_sft given each authors-arm anchored stage's epochs, over control_lrs
             (a grid reaching down far enough for long training to stay gentle); low_sft's
             control is sft's (the same objective on a lower grid). Without it the authors arm
             compares methods at unequal compute

Compute is counted in token passes of the model over padded rows: ``forward`` (the trained
model's forwards, every frozen model's forwards, and forward-only passes before training such as
stm's token filter) and ``backward`` (the trained model's), including the stage a point depends
on (its SFT reference), excluding the pretraining of p_base that every method shares.
``forward_equivalent`` = forward + 2 x backward (a backward pass costs about two forwards), so
that FLOPs ~ 2 x parameters x forward_equivalent: 6 x params x tokens for a trained token,
2 x params x tokens for a frozen forward.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Mapping, Optional

# Forwards of frozen models per trained token: kl_sft's reference; snapshot anchoring's reference
# and snapshot; live anchoring's reference only (its current logits are the policy's own
# forward, detached).
FROZEN_FORWARDS = {"sft": 0, "low_sft": 0, "dft": 0, "stm": 0, "kl_sft": 1,
                   "anchored_logit": 2, "anchored_prob": 2, "anchored_live": 1}
ANCHORED = ("anchored_logit", "anchored_prob", "anchored_live")
CONTROL_METHODS = ("sft", "kl_sft")
ARMS = ("equal", "authors", "control")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training as the compute accounting sees it."""

    steps: int
    tokens_per_step: int  # global batch x sequence length (padded rows)
    frozen_forwards: int = 0  # frozen models' forwards per trained token
    prepass_tokens: int = 0  # forward-only tokens before the first step (stm's filter)
    depends_on: Optional[str] = None  # the stage whose output it needs (its SFT reference)


def compute(plan: Mapping[str, Stage], name: str, steps: Optional[int] = None) -> dict:
    """Token passes of stage ``name`` after ``steps`` of its steps (all of them when None),
    plus every stage it depends on, in full."""
    stage = plan[name]
    done = stage.steps if steps is None else steps
    if not 0 <= done <= stage.steps:
        raise ValueError(f"{name}: steps={done} is outside [0, {stage.steps}]")
    trained = done * stage.tokens_per_step
    forward = trained * (1 + stage.frozen_forwards) + stage.prepass_tokens
    backward = trained
    if stage.depends_on is not None:
        before = compute(plan, stage.depends_on)
        forward, backward = forward + before["forward"], backward + before["backward"]
    return {"forward": forward, "backward": backward, "forward_equivalent": forward + 2 * backward}


@dataclasses.dataclass(frozen=True)
class PointSpec:
    """One fine-tuning point of the sweep, before it is a training."""

    method: str
    arm: str
    lr: float
    epochs: int  # passes over D: sft-stage epochs, or T x K
    alpha: Optional[float] = None  # anchored only
    outer_iterations: int = 1  # T (anchored)
    inner_epochs: int = 1  # K (anchored)
    reference_epochs: Optional[int] = None  # the SFT reference it uses (kl_sft, anchored)

    def series(self, alphas_swept: bool) -> str:
        """Its curve's name: the method, its alpha when alphas are swept, its arm unless equal
        (e.g. "anchored_logit a0.2 authors", "sft control25ep")."""
        parts = [self.method]
        if self.alpha is not None and alphas_swept:
            parts.append(f"a{self.alpha:g}")
        if self.arm == "authors":
            parts.append("authors")
        elif self.arm == "control":
            parts.append(f"control{self.epochs}ep")
        return " ".join(parts)

    def run_name(self, alphas_swept: bool) -> str:
        """Its run directory under OUT/runs/seedN (the equal arm keeps the names of a lab
        without arms, e.g. "sft_lr0.001")."""
        folder = {"equal": "", "authors": "authors/",
                  "control": f"control_e{self.epochs}/"}[self.arm]
        alpha = f"_a{self.alpha:g}" if self.alpha is not None and alphas_swept else ""
        return f"{folder}{self.method}{alpha}_lr{self.lr:g}"


def reference_epochs(settings) -> List[int]:
    """The epochs of every SFT reference the arms need (the equal arm's first)."""
    found = [settings.epochs]
    if "authors" in settings.budgets:
        found += [settings.authors_budgets[m][0] for m in settings.methods if m in ANCHORED]
    return list(dict.fromkeys(found))


def point_specs(settings) -> Iterator[PointSpec]:
    """Every fine-tuning point of one seed, arm by arm, in plan order."""
    s = settings
    for method in s.methods:
        for lr in s.low_lrs if method == "low_sft" else s.lrs:
            if method in ANCHORED:
                for alpha in s.alphas:
                    yield PointSpec(method, "equal", float(lr), s.epochs, float(alpha),
                                    s.outer_iterations, s.inner_epochs, s.epochs)
            else:
                yield PointSpec(method, "equal", float(lr), s.epochs,
                                reference_epochs=s.epochs if method == "kl_sft" else None)
    if "authors" not in s.budgets:
        return
    anchored = [m for m in s.methods if m in ANCHORED]
    for method in anchored:
        ref, outer, inner = s.authors_budgets[method]
        for lr in s.lrs:
            for alpha in s.alphas:
                yield PointSpec(method, "authors", float(lr), outer * inner, float(alpha),
                                outer, inner, ref)
    control_epochs = sorted({s.authors_budgets[m][1] * s.authors_budgets[m][2]
                             for m in anchored})
    for epochs in control_epochs:
        for method in (m for m in CONTROL_METHODS if m in s.methods):
            for lr in s.control_lrs:
                yield PointSpec(method, "control", float(lr), epochs,
                                reference_epochs=s.epochs if method == "kl_sft" else None)


def check_budgets(settings) -> None:
    """ValueError naming the setting when the arms are inconsistent."""
    s = settings
    unknown = set(s.budgets) - set(ARMS)
    if unknown:
        raise ValueError(f"budgets: unknown arm(s) {sorted(unknown)}; known: {ARMS}")
    if "equal" not in s.budgets:
        raise ValueError("budgets must include 'equal': the matched-domain bar is the equal "
                         "arm's SFT curve")
    if ("authors" in s.budgets) != ("control" in s.budgets):
        raise ValueError("budgets: 'authors' and 'control' go together: the control gives the "
                         "SFT family the authors arm's epochs, without which the authors arm "
                         "compares methods at unequal compute")
    # The equal arm's rule; the authors arm sets its own T and K (authors_budgets).
    if s.outer_iterations * s.inner_epochs != s.epochs:
        raise ValueError(f"outer_iterations x inner_epochs = {s.outer_iterations} x "
                         f"{s.inner_epochs} must equal epochs={s.epochs} (the equal budget "
                         "arm: the same data budget for every method; the authors arm's "
                         "budgets are authors_budgets)")
    if not s.alphas or not all(0 < a <= 1 for a in s.alphas):
        raise ValueError(f"alphas: {list(s.alphas)}: one or more values in (0, 1]")
    if "authors" in s.budgets:
        missing = [m for m in s.methods if m in ANCHORED and m not in s.authors_budgets]
        if missing:
            raise ValueError(f"authors_budgets: no (reference epochs, T, K) for {missing}")
        bad = {m: b for m, b in s.authors_budgets.items()
               if len(b) != 3 or not all(isinstance(n, int) and n >= 1 for n in b)}
        if bad:
            raise ValueError(f"authors_budgets: {bad}: each must be (reference epochs, T, K), "
                             "integers >= 1")
        if not s.control_lrs:
            raise ValueError("control_lrs: empty; the control arm needs a learning-rate grid")


def stage_for(spec: PointSpec, steps_per_epoch: int, tokens_per_step: int,
              prepass_tokens: int, reference: Optional[str]) -> Stage:
    """The accounting stage of ``spec`` (``reference``: its reference's stage name)."""
    return Stage(steps=spec.epochs * steps_per_epoch, tokens_per_step=tokens_per_step,
                 frozen_forwards=FROZEN_FORWARDS[spec.method],
                 prepass_tokens=prepass_tokens if spec.method == "stm" else 0,
                 depends_on=reference)


def reference_stage(epochs: int, steps_per_epoch: int, tokens_per_step: int) -> Stage:
    return Stage(steps=epochs * steps_per_epoch, tokens_per_step=tokens_per_step)


def outer_steps(spec: PointSpec, steps_per_epoch: int) -> Dict[int, int]:
    """Steps done at the end of each outer iteration (1-based) of an anchored point."""
    inner = spec.inner_epochs * steps_per_epoch
    return {outer: outer * inner for outer in range(1, spec.outer_iterations + 1)}
