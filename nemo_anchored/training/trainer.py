"""The training stage: SFT-stage methods and Anchored Learning on one megatron-core path.

    sft stage (sft, low_sft, kl_sft, dft, stm):  epochs (or max_steps) over the data
    anchored:  for t in 0..T-1:  [snapshot mode: snapshot <- policy]
                                 [restart: fresh optimizer and lr schedule]
                                 K epochs (or N steps) minimising KL(q(t) || p_theta)

Each step: the rank's micro-batches of one global batch go through megatron's schedule (1F1B
under pipeline parallelism) with the policy and its frozen companions co-resident, the method's
loss is computed on the vocab-sharded logits at the last stage, the step's metrics are reduced
over data-parallel ranks and shared with every rank, and megatron's optimizer steps. A
non-finite loss or gradient stops all ranks together before the update (so no weight and no
checkpoint takes it in), and so does a collapse (a gradient of exactly 0 for
trainer.stop_on_collapse_steps steps); a save refuses non-finite weights.

The position in the run (global step, outer iteration, inner step) is one counter, so the data
order, the lr schedule and checkpoints all derive from it and a resume continues exactly. The
events of a step are logged before that step's checkpoint is saved (its own "checkpoint" event
right after), so that a run resumed from it neither repeats nor loses one. One run per run
directory: rank 0 holds RUN_DIR/.lock (training/run_lock.py) from before the first write to the
end, and a resume checks what it continues from (training/resume.py).

From outside, a run ends in two more ways (docs/design/cluster.md): SIGTERM, SIGUSR1, SIGINT or
SIGHUP to any rank saves a checkpoint at the next step boundary and exits 0
(training/preemption.py); a peer that dies or stops answering for
parallelism.collective_timeout_s (before the world has started: parallelism.startup_timeout_s)
turns into a one-line ``PeerLost`` on every rank that waits for it. Either way the same command
resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from omegaconf import OmegaConf

from nemo_anchored.atomic import write_text
from nemo_anchored.checkpoint.sharded import load_checkpoint, load_model_weights, save_checkpoint
from nemo_anchored.config import ConfigError, GPTConfig
from nemo_anchored.data import BatchOrder, build_tokenizer, cached_sft_dataset
from nemo_anchored.errors import UserError
from nemo_anchored.models.co_resident import CoResidentModels
from nemo_anchored.models.gpt import build_gpt_model
from nemo_anchored.ops import fused_available
from nemo_anchored.parallel.distributed import ParallelContext, peer_failure
from nemo_anchored.parallel.schedule import forward_backward, wrap_for_training
from nemo_anchored.training.guards import TrainingDiverged, any_non_finite, gradients
from nemo_anchored.training.methods import MethodLoss
from nemo_anchored.training.metrics import MetricsLogger
from nemo_anchored.training.preemption import Preempted, PreemptionSignals
from nemo_anchored.training.resume import (data_identity, resume_point,
                                           set_aside_earlier_checkpoints, settings_of)
from nemo_anchored.training.run_lock import RunLock
from nemo_anchored.training.validation import Validation, split_off_validation

@dataclasses.dataclass
class Position:
    """Where the run is; everything else (data order, lr, snapshot refresh) follows from it."""

    global_step: int = 0  # optimizer steps taken
    outer: int = 0  # anchored: outer iteration
    inner_step: int = 0  # anchored: steps taken in this outer iteration


class PeerLost(RuntimeError, UserError):
    """Another rank died or stopped answering: this rank cannot go on."""


class Trainer:
    def __init__(self, cfg, ctx: ParallelContext,
                 preemption: Optional[PreemptionSignals] = None):
        self.cfg, self.ctx, self.preemption = cfg, ctx, preemption
        # (global step, path) of the newest checkpoint this run saved or resumed from.
        self.newest_checkpoint: Optional[Tuple[int, Path]] = None
        self.run_dir = Path(cfg.logging.dir)
        self.anchored = cfg.method == "anchored"
        self._check_device()

        try:
            tokenizer = build_tokenizer(cfg.data.tokenizer)
        except ValueError as error:  # a folder that is no loadable tokenizer, named by key
            raise ConfigError(str(error)) from error
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                              f"{cfg.data.tokenizer} tokenizer's {tokenizer.vocab_size} tokens")
        d = cfg.data
        dataset = cached_sft_dataset(d.train_path, tokenizer, d.seq_length,
                                     on_error=d.on_error, overlong=d.overlong,
                                     cache_dir=d.cache_dir)
        self.data_identity = data_identity(dataset)
        self.dataset, valid_set = split_off_validation(cfg, dataset, tokenizer)
        if d.packing:  # after the split, so that no row mixes training and held-out examples
            self.dataset = self.dataset.packed()
            valid_set = None if valid_set is None else valid_set.packed()
        t = cfg.trainer
        self.order = BatchOrder(len(self.dataset), t.global_batch_size, t.micro_batch_size,
                                ctx.dp_rank, ctx.dp_size, t.seed, d.shuffle,
                                train_path=d.train_path, packed=d.packing)
        self.stack = self._build_models()
        if d.packing and self.stack.policy.thd_packing and t.micro_batch_size != 1:
            raise ConfigError("data.packing: with Transformer Engine's attention, packed rows "
                              "run as megatron's THD packed sequences, one row per "
                              "micro-batch: set trainer.micro_batch_size=1")
        self.model = wrap_for_training(self.stack, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallelism.use_distributed_optimizer))
        self.loss = MethodLoss.for_config(cfg)
        # The method's own pass over the data (stm's token filter), before any step.
        self.prepare_summary = self.loss.prepare(self._forward_over_dataset, self.dataset,
                                                 ctx.device)

        steps_per_epoch = self.order.steps_per_epoch
        if self.anchored:
            a = cfg.anchor
            self.inner_total = a.inner_steps or a.inner_epochs * steps_per_epoch
            self.total_steps = a.outer_iterations * self.inner_total
        else:
            self.total_steps = t.max_steps or t.epochs * steps_per_epoch
        self.flat_steps = 0  # consecutive steps with a gradient of exactly 0 (collapse watch)
        self.validation = None if valid_set is None else Validation(
            cfg, valid_set, total_steps=self.total_steps, dp_rank=ctx.dp_rank,
            dp_size=ctx.dp_size, forward_only=self._forward_only, reduce_sums=self._reduce_sums,
            device=ctx.device)

    # ---------------------------------------------------------------------------------- setup

    def _check_device(self):
        wanted, have_cuda = self.cfg.trainer.device, torch.cuda.is_available()
        if wanted == "cuda" and not have_cuda:
            raise ConfigError("trainer.device: cuda requested but no GPU is visible")
        if wanted == "cpu" and have_cuda:
            raise ConfigError("trainer.device: cpu requested on a GPU machine: hide the GPUs "
                              "(CUDA_VISIBLE_DEVICES=) or use device=auto")

    def _build_models(self) -> CoResidentModels:
        cfg, gpt = self.cfg, GPTConfig.of(self.cfg.model)
        sequence_parallel = cfg.parallelism.sequence_parallel
        policy = build_gpt_model(gpt, sequence_parallel=sequence_parallel)
        # Grads are summed over valid tokens and divided by the global batch's count.
        policy.config.calculate_per_token_loss = True
        if cfg.model.base_checkpoint:
            load_model_weights(Path(cfg.model.base_checkpoint), policy)
        reference = snapshot = None
        if cfg.method in ("kl_sft", "anchored"):
            reference = build_gpt_model(gpt, sequence_parallel=sequence_parallel)
            load_model_weights(Path(cfg.model.reference_checkpoint), reference)
        if self.anchored and cfg.anchor.mode == "snapshot":
            # Filled at each outer iteration's start.
            snapshot = build_gpt_model(gpt, sequence_parallel=sequence_parallel)
        return CoResidentModels(policy, reference, snapshot)

    def _build_optimizer(self):
        """megatron's optimizer over the policy, and its lr schedule for one projection (or
        for the whole run when the optimizer is not restarted)."""
        o, dtype = self.cfg.optim, self.stack.config.params_dtype
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam" if o.name == "adamw" else "sgd", lr=o.lr, min_lr=o.min_lr,
            weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum, clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
            use_distributed_optimizer=self.cfg.parallelism.use_distributed_optimizer),
            [self.model])
        self.stack.config.grad_scale_func = optimizer.scale_loss  # fp16 loss scaling
        restart = self.anchored and self.cfg.anchor.restart_optimizer
        horizon = self.inner_total if restart else self.total_steps
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(horizon, o.warmup_steps + 1),
            lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(horizon, 1), wd_incr_style="constant")
        return optimizer, scheduler

    def _lr_from_config(self, optimizer, scheduler) -> None:
        """The config's optim.lr and optim.min_lr for the resumed steps. A resume restores the
        checkpoint's, in the scheduler and in every param group; they differ only where
        checkpoint.allow_changed_settings let another lr through, or min_lr changed."""
        o = self.cfg.optim
        if (scheduler.max_lr, scheduler.min_lr) == (o.lr, o.min_lr):
            return
        scheduler.max_lr, scheduler.min_lr = o.lr, o.min_lr
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = o.lr, o.min_lr
        scheduler.step(increment=0)  # every group's lr for the current step

    def _forward_over_dataset(self, loss_fn) -> List[Dict[str, torch.Tensor]]:
        """``loss_fn``'s outputs (last stage) for every row (example, or packed row) once, in
        order, from the models in eval mode without backward: the methods' passes before
        training."""
        n, mbs = len(self.dataset), self.cfg.trainer.micro_batch_size
        return self._forward_only([self.dataset.batch(torch.arange(i, i + mbs).clamp_max(n - 1))
                                   for i in range(0, n, mbs)], loss_fn)

    def _forward_only(self, batches, loss_fn) -> List[Dict[str, torch.Tensor]]:
        """``loss_fn``'s outputs (last stage) for this rank's ``batches`` of
        trainer.micro_batch_size examples, from the models in eval mode without backward."""
        self.stack.eval()
        outputs = forward_backward(self.model, iter(batches), loss_fn, forward_only=True,
                                   num_microbatches=len(batches),
                                   seq_length=self.cfg.data.seq_length,
                                   micro_batch_size=self.cfg.trainer.micro_batch_size)
        self.stack.train()
        return outputs

    # -------------------------------------------------------------------------------- training

    def fit(self) -> Path:
        """Runs (or resumes) the stage; returns the final weights' checkpoint directory."""
        cfg, pos = self.cfg, Position()
        with self._run_directory_lock() as notes:
            optimizer, scheduler = self._build_optimizer()
            resume, warnings = resume_point(self.cfg, self.run_dir, self.data_identity)
            self._together(lambda: self._check_writable() if self.ctx.rank == 0 else None)
            if cfg.checkpoint.resume == "none":
                aside = self._together(lambda: set_aside_earlier_checkpoints(
                    Path(cfg.checkpoint.dir)) if self.ctx.rank == 0 else None)
                warnings += [aside] if aside else []
            if resume is not None:
                state = load_checkpoint(resume, model=self.stack.policy, optimizer=optimizer,
                                        scheduler=scheduler, snapshot=self.stack.snapshot)
                self._lr_from_config(optimizer, scheduler)
                pos = Position(**state["position"])
                self.newest_checkpoint = (pos.global_step, resume)
            self.log = self._together(lambda: MetricsLogger(
                self.run_dir, total_steps=self.total_steps, resume_step=pos.global_step,
                enabled=self.ctx.rank == 0, tensorboard=cfg.logging.tensorboard,
                progress=cfg.logging.progress, config=cfg))
            self._announce(resume, pos, notes + warnings)
            if resume is None and not cfg.model.base_checkpoint:
                # Initialised from the seed: keep p_base, so later stages (anchor, other
                # layouts) can start from exactly these weights (model.base_checkpoint=
                # RUN_DIR/base).
                self._checkpoint(self.run_dir / "base", pos)
            try:
                if self.anchored:
                    self._fit_anchored(pos, optimizer, scheduler)
                elif pos.global_step < self.total_steps:  # else resumed from its last save
                    self._fit_steps(pos, optimizer, scheduler, self.total_steps)
                    self._save(pos, optimizer, scheduler)
                final = self.run_dir / "final"
                self._checkpoint(final, pos)
                self.log.info(f"final weights: {final}")
                return final
            finally:
                self.log.close()

    def _fit_anchored(self, pos: Position, optimizer, scheduler) -> None:
        a = self.cfg.anchor
        if pos.global_step == 0:
            self.log.log_event(0, "outer_iteration_start", outer=0)
        elif pos.inner_step == self.inner_total:  # resumed from an outer iteration's end
            pos.outer, pos.inner_step = pos.outer + 1, 0
        while pos.outer < a.outer_iterations:
            if pos.inner_step == 0:
                if self.stack.snapshot is not None:
                    self.stack.refresh_snapshot()
                if a.restart_optimizer and pos.outer > 0:
                    optimizer, scheduler = self._build_optimizer()
            self._fit_steps(pos, optimizer, scheduler, self.inner_total, inner=True)
            self.log.log_event(pos.global_step, "outer_iteration_end", outer=pos.outer)
            if pos.outer + 1 < a.outer_iterations:
                # Logged before this step's checkpoint, which a resume continues from with the
                # next outer iteration.
                self.log.log_event(pos.global_step, "outer_iteration_start", outer=pos.outer + 1)
            self._save(pos, optimizer, scheduler)
            pos.outer, pos.inner_step = pos.outer + 1, 0

    def _fit_steps(self, pos: Position, optimizer, scheduler, until: int, inner=False) -> None:
        every = self.cfg.checkpoint.save_every
        while (pos.inner_step if inner else pos.global_step) < until:
            self._stop_if_preempted(pos, optimizer, scheduler)
            self._train_step(pos, optimizer, scheduler)
            pos.global_step += 1
            pos.inner_step += inner
            done = (pos.inner_step if inner else pos.global_step) == until
            if every and pos.global_step % every == 0 and not done:
                self._save(pos, optimizer, scheduler)

    def _train_step(self, pos: Position, optimizer, scheduler) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        epoch, step_in_epoch = self.order.epoch_and_step(pos.global_step)
        batches = self.order.micro_batches(self.dataset, epoch, step_in_epoch)
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        optimizer.zero_grad()
        self.loss.step = pos.global_step
        outputs = forward_backward(self.model, iter(batches), self.loss,
                                   num_microbatches=len(batches),
                                   seq_length=cfg.data.seq_length,
                                   micro_batch_size=t.micro_batch_size)
        totals = self._reduce_sums(outputs)
        self._stop_if_non_finite(pos, epoch, totals)
        # The schedule's lr for this step (1-based) before the update: stepped after it, as
        # megatron's own loop does, step 1 (of every restarted outer iteration) ran at init_lr,
        # 0 under a warm-up, the last never at min_lr, and the lr logged was the next step's.
        scheduler.step(increment=1)
        updated, grad_norm, _ = optimizer.step()
        if not updated:  # fp16's loss scaler skipped the update: the step did not happen
            scheduler.step(increment=-1)
        elapsed = time.perf_counter() - start
        record = self._record(pos, epoch, totals, grad_norm, optimizer, elapsed)
        self.log.log_step(record)
        if record.get("tokens_over_bound", 0) > 0:
            self.log.log_event(record["step"], "bound_violation",
                               tokens=record["tokens_over_bound"])
        self._stop_if_collapsed(record)
        if self.validation is not None and self.validation.due(record["step"]):
            self.log.log_validation(record["step"], self.validation())

    def _stop_if_preempted(self, pos: Position, optimizer, scheduler) -> None:
        """At a step boundary, on every rank alike (they agree in one all-reduce): after a
        preemption signal (training/preemption.py) to any rank, saves a checkpoint here
        (unless the newest one is of this step already) and raises ``Preempted``. Before the
        first step there is nothing to save, so the signal is acted on after it."""
        if self.preemption is None or pos.global_step == 0:
            return
        received = self.preemption.agreed(self.ctx.device)
        if received is None:
            return
        if self.newest_checkpoint is None or self.newest_checkpoint[0] != pos.global_step:
            self._save(pos, optimizer, scheduler)
        path = self.newest_checkpoint[1]
        message = f"preempted by {received.name} after step {pos.global_step}: checkpoint " \
                  f"{path} saved; {how_to_resume(self.cfg, path)}"
        self.log.info(message)
        raise Preempted(message)

    def _stop_if_non_finite(self, pos, epoch, totals) -> None:
        """Before the update, on every rank alike (the totals and the gradient check are the
        same on all): a non-finite loss or gradient stops the run, so that neither the weights
        nor any checkpoint take it in."""
        found = []
        if totals["tokens"] > 0 and not math.isfinite(totals["loss"]):
            found.append(f"loss {totals['loss'] / totals['tokens']}")
        if any_non_finite(gradients(self.model), self.ctx.device):
            found.append("gradient")
        if found:
            raise TrainingDiverged(
                f"non-finite {' and '.join(found)} at step {pos.global_step + 1} (epoch "
                f"{epoch}): stopped before the update, so neither the weights nor any checkpoint "
                f"took it in. Likely cause: a learning rate too high for this model "
                f"(optim.lr={self.cfg.optim.lr}). {self._ways_on()}")

    def _stop_if_collapsed(self, record: dict) -> None:
        """A model collapsed to a constant output (a too-high learning rate saturates it) has a
        gradient of exactly 0 and learns nothing more, yet would train on to a normal exit.
        A step without valid tokens (possible under stm) trains nothing and does not count."""
        limit = self.cfg.trainer.stop_on_collapse_steps
        flat = record["grad_norm"] == 0 and record["valid_tokens"] > 0
        self.flat_steps = self.flat_steps + 1 if flat else 0
        if not limit or self.flat_steps < limit:
            return
        first, vocab = record["step"] - limit + 1, self.cfg.model.vocab_size
        uniform = "" if "ce" not in record else \
            f"; cross-entropy {record['ce']:.4f}, ln {vocab} = {math.log(vocab):.4f} is that of " \
            "a uniform output"
        raise TrainingDiverged(
            f"training collapsed: the gradient norm is exactly 0 at steps {first}..{record['step']}"
            f" ({limit} in a row: trainer.stop_on_collapse_steps) with the loss at "
            f"{record['loss']:.4g}{uniform}. The model has collapsed to a constant output and "
            f"learns nothing more; checkpoints saved from step {first} on hold it. Likely cause: "
            f"a learning rate too high for this model (optim.lr={self.cfg.optim.lr}). "
            f"{self._ways_on()} (trainer.stop_on_collapse_steps=0 disables this check)")

    def _ways_on(self) -> str:
        return (f"Resume from an earlier checkpoint in {self.cfg.checkpoint.dir} after fixing the "
                "cause (a changed optim.lr needs checkpoint.allow_changed_settings=true), or start "
                "over from step 0 with checkpoint.resume=none")

    def _reduce_sums(self, outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Sums over micro-batches (last stage), data-parallel ranks, then shared by all ranks."""
        device, keys = self.ctx.device, self.loss.sum_keys
        totals = torch.full((len(keys),), math.nan, dtype=torch.float64, device=device)
        if outputs:
            for i, key in enumerate(keys):
                if key in outputs[0]:
                    totals[i] = sum(out[key].double().to(device) for out in outputs)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return dict(zip(keys, totals.tolist()))

    def _record(self, pos, epoch, s, grad_norm, optimizer, elapsed) -> dict:
        # A batch with no valid token (possible under stm) trains nothing: no loss to report.
        tokens = s["tokens"] or math.nan
        record = {"step": pos.global_step + 1, "epoch": epoch, "loss": s["loss"] / tokens,
                  "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                  "lr": optimizer.param_groups[0]["lr"], "valid_tokens": int(s["tokens"]),
                  "step_time_s": elapsed,
                  "tokens_per_s": self.cfg.trainer.global_batch_size * self.cfg.data.seq_length
                  / elapsed,
                  "peak_memory_mib": _peak_memory_mib()}
        if self.anchored:
            record.update(outer=pos.outer, inner_step=pos.inner_step + 1)
        record.update(self.loss.metrics(s, tokens))
        return record

    # ------------------------------------------------------------------------- checkpoints

    @contextlib.contextmanager
    def _run_directory_lock(self) -> Iterator[List[str]]:
        """Rank 0 holds the run directory's lock for the block; when another run holds it,
        every rank raises its ``RunDirectoryLocked`` together. Yields the warnings for the log
        (rank 0: a previous holder that ended without releasing the lock)."""
        lock = RunLock(self.run_dir) if self.ctx.rank == 0 else None
        note = self._together(lambda: lock.acquire() if lock else None)
        try:
            yield [f"warning: {note}"] if note else []
        finally:
            if lock is not None:
                lock.release()

    def _check_writable(self) -> None:
        """ConfigError naming checkpoint.dir when it cannot be written: now, not at the first
        save after the training (or at a preemption's). The run folder has been written already:
        its lock."""
        folder = Path(self.cfg.checkpoint.dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"checkpoint.dir: cannot write to {folder}: "
                              f"{error.strerror or error}") from None

    def _together(self, fn):
        """``fn()`` on every rank, where it touches files on rank 0 only: what it raises there
        for a reason the user can fix (``UserError``, ``OSError``) is raised on every rank, so
        that none is left waiting in a collective that rank 0 never joins."""
        failure = result = None
        try:
            result = fn()
        except (UserError, OSError) as error:
            failure = error
        shared = [failure]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise shared[0]
        if failure is not None:
            raise failure
        return result

    def _save(self, pos: Position, optimizer, scheduler) -> None:
        path = Path(self.cfg.checkpoint.dir) / f"step_{pos.global_step:07d}"
        self._checkpoint(path, pos, optimizer=optimizer, scheduler=scheduler,
                         snapshot=self.stack.snapshot)
        self.newest_checkpoint = (pos.global_step, path)
        self.log.log_event(pos.global_step, "checkpoint", path=str(path))

    def _checkpoint(self, path: Path, pos: Position, **parts) -> None:
        """Saves the policy (and ``parts``) with the trainer state: the position and the
        settings a resume must share. Refuses non-finite policy weights, so that no checkpoint
        ever holds a diverged model."""
        if any_non_finite(list(self.stack.policy.parameters()), self.ctx.device):
            raise TrainingDiverged(
                f"the policy weights are not finite after step {pos.global_step}: refusing to "
                f"save {path}. Likely cause: a learning rate too high for this model "
                f"(optim.lr={self.cfg.optim.lr}). {self._ways_on()}")
        settings = settings_of(self.cfg, self.data_identity)
        save_checkpoint(path, model=self.stack.policy,
                        state={"position": vars(pos), "settings": settings}, **parts)

    def _announce(self, resume: Optional[Path], pos: Position, warnings: List[str]) -> None:
        if self.ctx.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_yaml(self.cfg)
        write_text(self.run_dir / "config.yaml", resolved)
        c = self.ctx
        self.log.info(f"resolved config (saved to {self.run_dir / 'config.yaml'}):\n{resolved}")
        self.log.info(f"layout: world {c.world_size} = TP {c.tp_size} x PP {c.pp_size} x "
                      f"DP {c.dp_size}; device {c.device}; resident models: "
                      f"{1 + len(self.stack.frozen_models)}")
        rows = "rows" if self.cfg.data.packing else "examples"
        self.log.info(f"data: {self.dataset.report.summary()}; {self.order.steps_per_epoch} "
                      f"steps per epoch ({self.order.unused_per_epoch} {rows} unused per "
                      "epoch: not a multiple of the global batch)")
        if self.cfg.data.packing:
            self.log.info(self.dataset.summary())
        if self.validation is not None:
            self.log.info(self.validation.summary)
        if self.prepare_summary is not None:
            self.log.info(self.prepare_summary)
        if self.cfg.method == "anchored":
            backend = self.cfg.anchor.backend
            if backend == "auto":
                backend = "fused" if fused_available(c.device) else "torch (the extension " \
                    f"nemo_anchored._C is not built for {c.device.type})"
            self.log.info(f"anchored KL kernels: {backend}")
        for warning in warnings:
            self.log.info(warning)
        if resume is not None:
            self.log.info(f"resumed from {resume} at step {pos.global_step}")


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib / 1024


def how_to_resume(cfg, path: Optional[Path] = None) -> str:
    """How a stopped run continues: from ``path``, or the newest complete checkpoint."""
    c = cfg.checkpoint
    if path is not None and path.parent != Path(c.dir):  # checkpoint.resume=PATH elsewhere
        return f"to continue, run the same command with checkpoint.resume={path}"
    newest = path or f"the newest complete checkpoint in {c.dir}"
    command = "the same command" if c.resume == "auto" else \
        "the same command with checkpoint.resume=auto"
    return f"{command} resumes from {newest}"


@contextlib.contextmanager
def _peer_failure_stops_the_run(message: Callable[[str], str]):
    """A lost peer (parallel/distributed.py's ``peer_failure``) inside the block becomes one
    ``PeerLost(message(what was lost))``; any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        what = peer_failure(error)
        if what is None:
            raise
        raise PeerLost(message(what)) from error


def run(cfg) -> Optional[Path]:
    """Initialise the parallel layout, train, tear down. Every rank calls this. Returns the
    final weights' checkpoint directory, or None when a signal preempted the run."""
    from nemo_anchored.parallel.distributed import init_model_parallel, shutdown

    p = cfg.parallelism
    with _peer_failure_stops_the_run(lambda what: (
            f"the ranks did not all start ({what}): a node or process did not come up within "
            f"parallelism.startup_timeout_s={p.startup_timeout_s:g} s, or cannot reach the "
            "others (MASTER_ADDR/MASTER_PORT, the network interface)")):
        ctx = init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  seed=cfg.trainer.seed, timeout_s=p.collective_timeout_s,
                                  startup_timeout_s=p.startup_timeout_s)
    try:
        with PreemptionSignals() as signals, _peer_failure_stops_the_run(lambda what: (
                f"lost a peer rank ({what}): another process or node died, or did not answer "
                f"within parallelism.collective_timeout_s={p.collective_timeout_s:g} s, so every "
                f"rank stops; {how_to_resume(cfg)}")):
            return Trainer(cfg, ctx, preemption=signals).fit()
    except Preempted:
        return None
    finally:
        shutdown()
