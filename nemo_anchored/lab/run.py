"""The forgetting lab: domain gain against general-skill loss, every method.

    1. tasks      OUT/data/*.jsonl: general skills (get, rev, srt, cd) and the iGSM-like domain
    2. p_base     the committed base (assets/lab_base, nemo_anchored/lab/base.py) when it was
                  pretrained with these settings; otherwise pretrain a tiny GPT from random init
                  on the general mix (method=sft) and use that run's final checkpoint
    3. per seed   the SFT references (sft at the reference lr on the domain data), then every
                  point of the budget arms (lab/budget.py: equal, authors, control) x lr (x
                  alpha for anchored) from p_base; kl_sft and anchored use that seed's
                  reference of their arm. Plan entries that are the same
                  training (lab/records.py: the reference and sft at its lr; sft and low_sft
                  at a shared lr) run once, and each finished training's scores are recorded
                  as it ends, so the same command run again continues where it stopped
    4. evaluate   greedy exact match on the held-out domain and general sets and KL(model ||
                  p_base) on the general set, every final model (anchored: also after every
                  outer iteration, each a point of the sweep), with each point's compute
    5. report     OUT/results.json (with the summary of lab/summary.py: each method at matched
                  domain accuracy, how close each verdict is), OUT/pareto.png and .pdf,
                  OUT/results.md (the Markdown tables of lab/report.py, also printed), a
                  progress bar over the runs while it trains

Everything runs in one process (one process group; megatron's groups are rebuilt per run),
through the project's own Trainer, or with ``jobs`` > 1 the fine-tunings run that many at a
time in worker processes, with the same results; `nemo-anchored lab` (cli/lab.py) runs it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nemo_anchored.data.builders import write_jsonl
from nemo_anchored.host import cpu_model
from nemo_anchored.lab import budget
from nemo_anchored.lab.base import (file_digests, pretrain_fingerprint, verified_committed_base,
                                    write_committed_base)
from nemo_anchored.lab.records import (RUN_RECORD, check_settings, read_run, training_identity,
                                       training_name, write_run)
from nemo_anchored.lab.report import write_report
from nemo_anchored.lab.settings import COMMITTED_BASES, METHOD_OVERRIDES, RECIPE, LabSettings
from nemo_anchored.lab.summary import MATCH_FRACTION, SPREAD
from nemo_anchored.lab.tasks import GENERAL_TASKS, make_splits


def eval_batch(recipe: Path, path: Path) -> dict:
    """A held-out JSONL set as one teacher-forcing batch (the recipe's tokenizer and length)."""
    from nemo_anchored.config import load_config
    from nemo_anchored.data import build_tokenizer, load_sft_dataset

    cfg = load_config(recipe, check_paths=False)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    data = load_sft_dataset(path, tokenizer, cfg.data.seq_length, overlong="raise")
    return {**data.batch(range(len(data))), "vocab_size": tokenizer.vocab_size}


def response_logprobs(model, batch: dict):
    from nemo_anchored.eval.divergence import response_logprobs as logprobs

    return logprobs(model, batch, batch["vocab_size"])


def kl_to_reference(model, batch: dict, reference_logprobs) -> float:
    """Mean KL(model || reference) per response token of ``batch``."""
    from nemo_anchored.eval.divergence import mean_kl

    return mean_kl(response_logprobs(model, batch), reference_logprobs, batch["loss_mask"])


def _key(training) -> str:
    return json.dumps(training.identity, sort_keys=True)


def _complete(checkpoint: Path) -> bool:
    from nemo_anchored.checkpoint.format import CheckpointError, read_marker

    try:
        read_marker(checkpoint)
    except CheckpointError:
        return False
    return True


@dataclasses.dataclass
class Training:
    """One Trainer run of the lab."""

    name: str  # its run directory under OUT/runs, e.g. "seed1000/sft_lr0.001"
    overrides: List[str]
    seed: int
    identity: dict  # records.training_identity of its config
    evaluate: bool = True


class Lab:
    def __init__(self, out: Path, settings: LabSettings, recipe: Path = RECIPE,
                 log=print, committed_bases: Sequence[Path] = COMMITTED_BASES, jobs: int = 1):
        settings.check()
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.out, self.s, self.recipe, self.log = Path(out), settings, Path(recipe), log
        self.committed_bases, self.jobs = committed_bases, jobs
        self.failed: List[dict] = []
        self.timings: Dict[str, float] = {}
        self.records: Dict[str, dict] = {}  # by training name, once finished or read back
        self.trained: Set[str] = set()  # the trainings run by this lab (not read back)
        self.progress = None

    def _training(self, name: str, train_path: Path, seed: int, lr: float,
                  extra: Sequence[str], evaluate: bool = True) -> Training:
        from nemo_anchored.config import load_config

        overrides = [*self.s.model_overrides, f"logging.dir={self.out / 'runs' / name}",
                     f"data.train_path={train_path}", f"trainer.seed={seed}", f"optim.lr={lr}",
                     "logging.progress=false", "logging.tensorboard=false",
                     "logging.diagnostics_every=0", "checkpoint.save_every=0",
                     "checkpoint.resume=none", *extra]
        # check_paths=False: the plan names references that are trained later.
        cfg = load_config(self.recipe, overrides, check_paths=False)
        return Training(name, overrides, seed, training_identity(cfg), evaluate)

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message)
        else:
            self.log(message)

    def _result(self, training: Training) -> dict:
        """The record of ``training`` (see ``_read_or_train``), kept for the rest of the lab."""
        if training.name not in self.records:
            self._keep(training, *self._read_or_train(training))
        return self.records[training.name]

    def _recorded(self, training: Training) -> Optional[dict]:
        """The record of ``training`` when an earlier lab in OUT finished it (its final
        checkpoint still complete, unless it failed), else None."""
        run_dir = self.out / "runs" / training.name
        record = read_run(run_dir, training.identity)
        if record is not None and ("failed" in record or _complete(run_dir / "final")):
            return record
        return None

    def _read_or_train(self, training: Training) -> Tuple[dict, bool]:
        """The record of ``training``, read back (``_recorded``), else trained now and recorded;
        and whether it was trained now."""
        record = self._recorded(training)
        if record is not None:
            return record, False
        run_dir = self.out / "runs" / training.name
        shutil.rmtree(run_dir, ignore_errors=True)  # what a killed attempt left
        return write_run(run_dir, training.identity, self._train(training)), True

    def _keep(self, training: Training, record: dict, trained: bool) -> None:
        self.records[training.name] = record
        self.timings[training.name] = record["time_s"]
        if trained:
            self.trained.add(training.name)
        if "failed" in record:
            self.failed.append({"run": training.name, "error": record["failed"]})
        if self.progress is not None:
            self.progress.update()

    def _train_in_parallel(self, trainings: Sequence[Training], base_final: Path) -> None:
        """Reads back what is recorded, then trains the rest ``jobs`` at a time in worker
        processes (spawned: each its own world of one process, its own megatron state,
        OMP_NUM_THREADS threads), the SFT references first: the others start from them, so
        after a failed reference nothing more starts (the sequential pass that follows, which
        finds every record here, reports it). A worker records a training as the sequential
        pass would. A training's result does not depend on the process that runs it (each is
        seeded from its own config), so any ``jobs`` gives the same results.json."""
        import multiprocessing
        import warnings
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pending = []
        for training in trainings:
            record = self._recorded(training)
            if record is None:
                pending.append(training)
            else:
                self._keep(training, record, trained=False)
        if not pending:
            return
        waves = ([t for t in pending if t.name in self.references],
                 [t for t in pending if t.name not in self.references])
        workers = min(self.jobs, len(pending))
        self._say(f"lab: {len(pending)} trainings, {workers} at a time in worker processes")
        pool = ProcessPoolExecutor(workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker,
                                   initargs=(self.out, self.s, self.recipe, base_final,
                                             list(warnings.filters), os.getpid()))
        try:
            for wave in waves:
                if any("failed" in self.records.get(name, {}) for name in self.references):
                    return
                futures = {pool.submit(_read_or_train_in_worker, t.name): t for t in wave}
                for future in as_completed(futures):
                    self._keep(futures[future], *future.result())
        finally:
            # On an error, the trainings already running finish (and are recorded), and the
            # one the pool has already handed to its queue; the others are dropped.
            pool.shutdown(cancel_futures=True)

    def _train(self, training: Training) -> dict:
        """One Trainer run in its own model-parallel scope: {"scores", "time_s"}, or {"failed":
        the error's first line, "time_s"}. Anchored runs also score the checkpoint of every
        outer iteration (scores["trace"])."""
        from nemo_anchored.checkpoint.sharded import load_model_weights
        from nemo_anchored.config import ConfigError, load_config
        from nemo_anchored.parallel.distributed import model_parallel
        from nemo_anchored.training.trainer import Trainer

        cfg = load_config(self.recipe, training.overrides)
        start = time.perf_counter()
        run_dir = Path(cfg.logging.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.progress is not None:
            self.progress.set_description(training.name)
        # The Trainer prints its resolved config and messages: into the run's train.log.
        with open(run_dir / "train.log", "w") as stream, contextlib.redirect_stdout(stream), \
                model_parallel(1, 1, seed=training.seed) as ctx:
            try:
                trainer = Trainer(cfg, ctx)
                trainer.fit()
            except (ConfigError, FloatingPointError) as error:
                return {"failed": str(error).splitlines()[0],
                        "time_s": time.perf_counter() - start}
            scores = None
            if training.evaluate:
                policy = trainer.stack.policy
                scores = self._evaluate(policy)  # the policy holds the final weights
                if cfg.method == "anchored":
                    # Every outer iteration's checkpoint in step order; the last one holds the
                    # final weights (the lab saves only at outer-iteration ends).
                    steps = sorted(Path(cfg.checkpoint.dir).glob("step_*"))
                    trace = []
                    for outer, path in enumerate(steps[:-1]):
                        load_model_weights(path, policy)
                        trace.append({"outer": outer, "step": int(path.name[5:]),
                                      **self._evaluate(policy)})
                    trace.append({"outer": len(steps) - 1, "step": int(steps[-1].name[5:]),
                                  **scores})
                    scores["trace"] = trace
        if not self.s.keep_checkpoints:
            shutil.rmtree(Path(cfg.checkpoint.dir), ignore_errors=True)
        return {"scores": scores, "time_s": time.perf_counter() - start}
    @contextlib.contextmanager
    def _checkpoint_model(self, path: Path):
        """The lab's model with the weights of the checkpoint at ``path``, in its own
        model-parallel scope."""
        from nemo_anchored.checkpoint.sharded import load_model_weights
        from nemo_anchored.config import GPTConfig, load_config
        from nemo_anchored.models.gpt import build_gpt_model
        from nemo_anchored.parallel.distributed import model_parallel

        cfg = load_config(self.recipe, [*self.s.model_overrides], check_paths=False)
        with model_parallel(1, 1, seed=0):
            model = build_gpt_model(GPTConfig.of(cfg.model))
            load_model_weights(path, model)
            yield model

    def _evaluate(self, model) -> dict:
        """Greedy exact match on the held-out sets, and KL(model || p_base) per response token
        of the general set (how far the model moved where it should not have)."""
        from nemo_anchored.data import ByteTokenizer
        from nemo_anchored.eval.generate import exact_match

        tok, n = ByteTokenizer(), self.s.max_new_tokens
        domain = exact_match(model, tok, self.domain["eval"], max_new_tokens=n)
        general, by_task = exact_match(model, tok, self.general["eval"], max_new_tokens=n,
                                       by_task=True)
        scores = {"domain": domain, "general": general, "general_by_task": by_task}
        if self.base_logprobs is not None:
            scores["kl_to_base_general"] = kl_to_reference(model, self.general_eval_batch,
                                                           self.base_logprobs)
        return scores

    def _score_base(self, base_checkpoint: Path) -> dict:
        """p_base's scores; keeps its log-probs on the general held-out set as the reference
        of every later run's KL to the base."""
        with self._checkpoint_model(base_checkpoint) as model:
            self.base_logprobs = response_logprobs(model, self.general_eval_batch)
            return self._evaluate(model)

    def _plan(self, base_final: Path, paths: dict) -> List[tuple]:
        """(seed, PointSpec or None, Training) of every fine-tuning training, in order; per seed
        the SFT references first (the equal arm's is also its sft point at reference_lr; the
        authors arm's, with their own epochs, are no points: spec None). Entries whose
        trainings have equal identities (lab/records.py) share one Training, the first one
        planned. Fills self.stages, the compute accounting's plan (lab/budget.py)."""
        from nemo_anchored.config import load_config

        s, plan, trainings = self.s, [], {}
        cfg = load_config(self.recipe, list(s.model_overrides), check_paths=False)
        batch, mbs = cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size
        steps_per_epoch = s.domain_train // batch
        tokens_per_step = batch * cfg.data.seq_length
        prepass = -(-s.domain_train // mbs) * mbs * cfg.data.seq_length
        swept = len(s.alphas) > 1
        self.stages: Dict[str, budget.Stage] = {}
        self.references: Dict[str, int] = {}  # the SFT references' training names: epochs
        equal_reference = budget.PointSpec("sft", "equal", float(s.reference_lr), s.epochs)
        for seed in self.s.seed_values():
            references = {}  # epochs -> its training's name
            for epochs in budget.reference_epochs(s):
                spec = equal_reference if epochs == s.epochs else None
                name = spec.run_name(swept) if spec else f"reference_e{epochs}_lr{s.reference_lr:g}"
                training = self._training(
                    training_name(seed, name), paths["domain", "train"], seed, s.reference_lr,
                    [f"model.base_checkpoint={base_final}", f"trainer.epochs={epochs}",
                     *self._baseline_overrides(), *METHOD_OVERRIDES["sft"]])
                training = trainings.setdefault(_key(training), training)
                references[epochs] = training.name
                self.references[training.name] = epochs
                self.stages[training.name] = budget.reference_stage(epochs, steps_per_epoch,
                                                                    tokens_per_step)
                plan.append((seed, spec, training))
            for spec in budget.point_specs(s):
                if spec == equal_reference:
                    continue  # planned above
                extra = [f"model.base_checkpoint={base_final}", f"trainer.epochs={spec.epochs}",
                         *self._baseline_overrides(), *METHOD_OVERRIDES[spec.method]]
                if spec.alpha is not None:
                    extra += [f"anchor.alpha={spec.alpha}",
                              f"anchor.outer_iterations={spec.outer_iterations}",
                              f"anchor.inner_epochs={spec.inner_epochs}"]
                reference = references.get(spec.reference_epochs)
                if reference is not None:
                    extra.append("model.reference_checkpoint="
                                 f"{self.out / 'runs' / reference / 'final'}")
                training = self._training(training_name(seed, spec.run_name(swept)),
                                          paths["domain", "train"], seed, spec.lr, extra)
                training = trainings.setdefault(_key(training), training)
                self.stages.setdefault(training.name, budget.stage_for(
                    spec, steps_per_epoch, tokens_per_step, prepass, reference))
                plan.append((seed, spec, training))
        self.steps_per_epoch = steps_per_epoch
        return plan

    def _reference_row(self, seed: int, training: Training, record: dict) -> dict:
        """The scores of an SFT reference that is no point of the sweep (the authors arm's):
        the anchored runs toward it can learn no more of the domain than it has. A record of
        an earlier lab that did not score references is scored from its final checkpoint."""
        scores = record["scores"]
        if scores is None:
            with self._checkpoint_model(self.out / "runs" / training.name / "final") as model:
                scores = self._evaluate(model)
        return {"run": training.name, "seed": seed, "epochs": self.references[training.name],
                "lr": self.s.reference_lr, "domain": scores["domain"],
                "general": scores["general"], "kl_to_base_general": scores["kl_to_base_general"],
                "compute_passes": budget.compute(self.stages, training.name)}

    def _baseline_overrides(self) -> List[str]:
        return [f"baselines.kl_lambda={self.s.kl_lambda}",
                f"baselines.stm_threshold={self.s.stm_threshold}"]

    def _points(self, seed: int, spec: budget.PointSpec, training: Training,
                scores: dict) -> List[dict]:
        """The sweep points of one planned spec: its final model, and for anchored specs every
        outer iteration's checkpoint, each with the compute spent up to it."""
        point = {"method": spec.method, "series": spec.series(len(self.s.alphas) > 1),
                 "arm": spec.arm, "alpha": spec.alpha, "lr": spec.lr, "seed": seed}
        if "trace" not in scores:
            return [{**point, "outer": None, "outers": None, "domain": scores["domain"],
                     "general": scores["general"],
                     "compute": budget.compute(self.stages, training.name)["forward_equivalent"]}]
        steps = budget.outer_steps(spec, self.steps_per_epoch)
        return [{**point, "outer": t["outer"] + 1, "outers": spec.outer_iterations,
                 "domain": t["domain"], "general": t["general"],
                 "compute": budget.compute(self.stages, training.name,
                                           steps[t["outer"] + 1])["forward_equivalent"]}
                for t in scores["trace"]]

    def _find_base(self) -> Optional[Path]:
        """The p_base to start from without pretraining: settings.base_checkpoint, else the
        committed one made with this lab's settings (checksums verified)."""
        if self.s.base_checkpoint:
            return Path(self.s.base_checkpoint)
        folders = [f for f in self.committed_bases if (f / "base.json").is_file()]
        fingerprint = pretrain_fingerprint(self.recipe, self.s)
        for folder in folders:
            checkpoint = verified_committed_base(folder, fingerprint)
            if checkpoint is not None:
                return checkpoint
        if folders:
            self.log(f"lab: the committed bases ({', '.join(map(str, folders))}) were pretrained "
                     "with other settings: pretraining a new one")
        else:
            self.log(f"lab: no committed base in {', '.join(map(str, self.committed_bases))} (a "
                     "clone of the repository has them, an installed package does not): "
                     "pretraining a new one")
        return None

    def pretrain(self, paths) -> Path:
        s = self.s
        self.log(f"lab: pretraining p_base on {s.general_train} general examples "
                 f"({s.pretrain_epochs} epochs, lr {s.pretrain_lr:g})")
        training = self._training(
            "pretrain", paths["general", "train"], 1234, s.pretrain_lr,
            ["method=sft", f"trainer.epochs={s.pretrain_epochs}", "optim.decay_style=cosine",
             f"optim.warmup_steps={s.pretrain_warmup_steps}"], evaluate=False)
        record = self._result(training)
        if "failed" in record:
            raise RuntimeError(f"pretraining the base failed: {record['failed']}")
        return self.out / "runs" / training.name / "final"

    def _prepare(self, write: bool = True) -> dict:
        """Writes the task data (a worker process reads what its lab wrote); returns the JSONL
        paths by (kind, split)."""
        import torch

        from nemo_anchored.parallel.distributed import init_process_group

        s = self.s
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.general = make_splits("general", s.general_train, s.general_eval, s.data_seed)
        self.domain = make_splits("domain", s.domain_train, s.domain_eval, s.data_seed)
        paths = {}
        for kind, splits in (("general", self.general), ("domain", self.domain)):
            for split, examples in splits.items():
                paths[kind, split] = data / f"{kind}_{split}.jsonl"
                if write:
                    write_jsonl(paths[kind, split], examples)
        self.general_eval_batch = eval_batch(self.recipe, paths["general", "eval"])
        self.base_logprobs = None
        init_process_group()
        return paths

    def run(self) -> dict:
        """The whole lab; in an OUT that holds an unfinished (or finished) lab with the same
        settings, it continues from the recorded trainings (lab/records.py)."""
        from nemo_anchored.training.run_lock import RunLock

        lock = RunLock(self.out)  # one lab per OUT: two would train into the same run dirs
        note = lock.acquire()
        try:
            if note:
                self.log(f"lab: {note}")
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        from tqdm import tqdm

        s, out = self.s, self.out
        t0 = time.perf_counter()
        base_final = self._find_base()
        check_settings(out, {
            # Without seed_indices when every seed runs: a lab begun before shards existed
            # continues.
            "settings": {k: v for k, v in dataclasses.asdict(s).items()
                         if k != "keep_checkpoints"
                         and not (k == "seed_indices" and v is None)},
            "base": {"checkpoint": "pretrained in OUT/runs/pretrain"} if base_final is None
            else {"checkpoint": str(base_final), "sha256": file_digests(base_final)}})
        paths = self._prepare()
        if base_final is None:
            base_final = self.pretrain(paths)
        else:
            self.log(f"lab: p_base from {base_final} (no pretraining)")
        base = self._score_base(base_final)
        self.log(f"  base: domain {base['domain']:.3f}, general {base['general']:.3f} "
                 f"{base['general_by_task']}")

        points: List[dict] = []
        details: List[dict] = []
        references: List[dict] = []
        plan = self._plan(base_final, paths)
        trainings = list({id(t): t for *_, t in plan}.values())
        position = {t.name: i for i, t in enumerate(trainings)}  # for plan order, below
        done = sum((out / "runs" / t.name / RUN_RECORD).is_file() for t in trainings)
        if done:
            self.log(f"lab: continuing in {out}: {done} of {len(trainings)} trainings "
                     "recorded by an earlier run")
        self.progress = tqdm(total=len(trainings), unit="run", dynamic_ncols=True)
        swept = len(s.alphas) > 1
        try:
            if self.jobs > 1:
                self._train_in_parallel(trainings, base_final)
            shown: Set[str] = set()  # the trainings whose scores are already printed
            for seed, spec, training in plan:
                shared = training.name in shown
                shown.add(training.name)
                record = self._result(training)
                if "failed" in record and training.name in self.references:
                    raise RuntimeError(f"the SFT reference {training.name} failed: "
                                       f"{record['failed']}")
                if spec is None:  # a reference with epochs of its own: no point of the sweep
                    references.append(self._reference_row(seed, training, record))
                    continue
                name = training_name(seed, spec.run_name(swept))
                if "failed" in record:
                    self._say(f"  {name}: FAILED ({record['failed']})")
                    continue
                scores = record["scores"]
                found = self._points(seed, spec, training, scores)
                points += found
                details.append({**found[-1], "run": training.name,
                                "compute_passes": budget.compute(self.stages, training.name),
                                **{k: v for k, v in scores.items()
                                   if k not in ("domain", "general")}})
                how = (f"the training of {training.name}" if shared
                       else f"{record['time_s']:.1f} s" if training.name in self.trained
                       else "recorded earlier")
                self._say(f"  {name}: domain {scores['domain']:.3f}, general "
                          f"{scores['general']:.3f}, KL to base "
                          f"{scores['kl_to_base_general']:.3f}  ({how})")
        finally:
            self.progress.close()
            self.progress = None
        # In plan order, as one process records them (workers finish in any order).
        self.timings = dict(sorted(self.timings.items(), key=lambda kv: position.get(kv[0], -1)))
        wall = time.perf_counter() - t0
        results = write_report(out, points, details, references, base,
                               sorted(self.failed, key=lambda f: position[f["run"]]),
                               self._config_record(wall, base_final), self.log)
        self.log(f"\nlab: {len(points)} points from {len(trainings)} fine-tuning trainings "
                 f"(each seed's SFT reference is also its sft point at lr {s.reference_lr:g}; "
                 f"points with the same training config share one), wall {wall:.0f} s; "
                 f"{out / 'results.json'}, {out / 'pareto.png'} (and .pdf)")
        return results

    def _config_record(self, wall: float, base_final: Path) -> dict:
        s = self.s
        return {
            "settings": json.loads(json.dumps(dataclasses.asdict(s))),
            "recipe": str(self.recipe),
            "seeds": self.s.seed_values(),
            "budgets": list(s.budgets),
            "data_budget": f"equal arm: {s.epochs} epochs over D for every method; anchored: "
                           f"T={s.outer_iterations} outer x K={s.inner_epochs} inner epochs"
                           + ("" if "authors" not in s.budgets else
                              f"; authors arm (reference epochs, T, K): "
                              f"{dict(s.authors_budgets)}; control arm: sft and kl_sft at the "
                              f"authors arm's T x K epochs over lrs {list(s.control_lrs)}"),
            "alphas": list(s.alphas),
            "reference": f"per seed: sft at lr {s.reference_lr:g}, {s.epochs} epochs from the "
                         "base; reused as the sft point at that lr and seed. kl_sft and the "
                         "equal arm's anchored_* depend on it; the authors arm's anchored "
                         "variants on sft at that lr with their own reference epochs",
            "compute": budget.__doc__.split("Compute is counted in ")[1].strip(),
            "outer_points": "every outer iteration's checkpoint of an anchored run is a point "
                            "of its sweep (points[].outer of points[].outers)",
            "shared_trainings": "points whose resolved training configs are equal (sft and "
                                "low_sft at a shared lr: the same objective) come from one "
                                "training, named in point_details[].run",
            "base": f"{base_final}: pretrained once (trainer.seed 1234, cosine lr, warm-up) "
                    "on the general training mix from random init (assets/lab_base and "
                    "lab_base_full: committed, each regenerated by the command in its "
                    "base.json); the same base for every seed",
            "base_sha256": file_digests(base_final),
            "seed_varies": "the fine-tuning data order (trainer.seed); data sets, base and eval "
                           "sets are the same for every seed",
            "evaluation": f"greedy decoding, exact match of the response, max_new_tokens="
                          f"{s.max_new_tokens}, held-out sets: {s.domain_eval} domain, "
                          f"{s.general_eval} general ({', '.join(GENERAL_TASKS)})",
            "matched_rule": f"per series, among sweep points (lr, outer iteration) with every "
                            f"seed whose seed-mean domain >= {MATCH_FRACTION} x the best such "
                            "sft domain: the best seed-mean general (ties: higher domain, then "
                            "less compute, then lower lr; null when none qualifies); stds are "
                            "sample stds over seeds",
            "verdicts": SPREAD,
            "wall_time_s": wall,
            "jobs": self.jobs,  # trainings run at a time (the wall time's, not the results')
            "machine": _machine(),
            "run_time_s": self.timings,
        }


def _machine() -> str:
    """The CPU the lab ran on and the threads each training used (its times' context)."""
    import torch

    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads per training"


# A worker process's lab (Lab._train_in_parallel) and its trainings by name.
_worker: Optional[Tuple[Lab, Dict[str, Training]]] = None


def _start_worker(out: Path, settings: LabSettings, recipe: Path, base_final: Path,
                  filters: list, lab_pid: int) -> None:
    """Rebuilds in a worker process what its trainings need: the evaluation sets, p_base's
    log-probs (the KL to the base), the plan; and the lab's process's warning filters (the
    command line's hide megatron's noise). The worker dies with the lab's process, and what
    it forks with it (nemo_anchored/lifetime.py)."""
    import warnings

    from nemo_anchored.lifetime import die_with_parent, forked_children_die_with_this_process

    global _worker
    die_with_parent(lab_pid)
    forked_children_die_with_this_process()
    warnings.filters[:] = filters
    lab = Lab(out, settings, recipe, log=lambda *args: None, committed_bases=())
    paths = lab._prepare(write=False)
    lab._score_base(base_final)
    _worker = lab, {t.name: t for *_, t in lab._plan(base_final, paths)}


def _read_or_train_in_worker(name: str) -> Tuple[dict, bool]:
    lab, trainings = _worker
    return lab._read_or_train(trainings[name])


def pretrain_only(out: Path, settings: LabSettings, command: str) -> Path:
    """Pretrain p_base in a scratch directory and write it as a committed base to ``out``
    (``command``: the one that does this, recorded with it)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lab_pretrain_") as work:
        lab = Lab(Path(work), settings, committed_bases=())
        final = lab.pretrain(lab._prepare())
        with lab._checkpoint_model(final) as model:
            scores = lab._evaluate(model)
        checkpoint = write_committed_base(out, final, pretrain_fingerprint(RECIPE, settings),
                                          {k: scores[k] for k in ("domain", "general",
                                                                   "general_by_task")},
                                          command)
    print(f"lab: p_base (domain {scores['domain']:.3f}, general {scores['general']:.3f}) "
          f"written to {checkpoint}, settings and SHA-256 in {out / 'base.json'}")
    return checkpoint
