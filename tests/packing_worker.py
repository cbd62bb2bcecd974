"""Worker for tests/test_packing.py: packed rows against one example per row, through the
trainer's own construction and step path, under torchrun with 2 processes at TP=2.

    torchrun --nproc_per_node=2 tests/packing_worker.py --out CHECKS.json --work DIR

For sft at TP=2 with megatron's own attention (model.attention=local, DotProductAttention),
anchored (snapshot mode: three resident models) at TP=2 and sft at PP=2 (the mask and positions
must reach the second stage too) with the default attention (auto: SDPA without Transformer
Engine), the same examples go through one
global batch twice: padded one per row (data.packing=false) and packed into rows
(data.packing=true, two rows per micro-batch). The trainer is built as ``nemo-anchored`` builds
it (recipes/tiny_cpu.yaml), its micro-batches go through megatron's schedule with the method's
loss, and the step's summed loss, token count and metric sums, and every policy gradient of
this rank's shard, must agree within fp32 rounding. The anchored run's reference is the padded
sft run's policy moved one gradient step away, so its loss and gradients are not trivially 0.
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_anchored.config import load_config
from nemo_anchored.parallel.distributed import init_process_group, model_parallel
from nemo_anchored.parallel.schedule import forward_backward
from nemo_anchored.training.trainer import Position, Trainer
from tests.launch import CheckLog

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
EXAMPLES = 24  # pack into 8 rows of 64 positions (3 examples each): 4 packed micro-batches
TOL = 1e-5  # relative, fp32


def one_step(work: Path, overrides, save_reference: Path = None, tp: int = 2, pp: int = 1):
    """(step totals, {name: this rank's policy gradient}, micro-batches) of the first global
    batch, from a trainer built for ``overrides``; ``save_reference``: also save its policy,
    moved one gradient step, there (as a trained checkpoint)."""
    cfg = load_config(RECIPE, [
        f"data.train_path={work / 'data.jsonl'}", "data.seq_length=64", "data.shuffle=false",
        "data.cache_dir=null", f"logging.dir={work / 'run'}",
        f"parallelism.tensor_model_parallel_size={tp}",
        f"parallelism.pipeline_model_parallel_size={pp}", *overrides], world_size=2)
    with model_parallel(tp, pp, seed=cfg.trainer.seed) as ctx:
        trainer = Trainer(cfg, ctx)
        if trainer.stack.snapshot is not None:
            trainer.stack.refresh_snapshot()  # as at the first outer iteration's start
        batches = trainer.order.micro_batches(trainer.dataset, 0, 0)
        trainer.model.zero_grad_buffer()
        outputs = forward_backward(trainer.model, iter(batches), trainer.loss,
                                   num_microbatches=len(batches),
                                   seq_length=cfg.data.seq_length,
                                   micro_batch_size=cfg.trainer.micro_batch_size)
        totals = trainer._reduce_sums(outputs)
        policy = trainer.stack.policy
        grads = {name: p.main_grad.detach().clone() for name, p in policy.named_parameters()}
        if save_reference is not None:
            with torch.no_grad():
                for p in policy.parameters():
                    p.sub_(p.main_grad, alpha=1.0)
            trainer._checkpoint(save_reference, Position(global_step=1))
    return totals, grads, batches


def compare(log: CheckLog, topic: str, padded, packed) -> None:
    (totals, grads, padded_batches), (packed_totals, packed_grads, packed_batches) = \
        padded, packed
    log.expect(topic, "packed rows hold several examples",
               len(packed_batches) < len(padded_batches)
               and all("attention_mask" in b for b in packed_batches))
    log.expect(topic, "the same response tokens", totals["tokens"] == packed_totals["tokens"])
    for key, value in totals.items():
        log.check(topic, f"sum of {key}", abs(packed_totals[key] - value) / (abs(value) or 1))
    log.expect(topic, "a loss and gradient that are not 0",
               totals["loss"] > 0 and all(g.abs().max() > 0 for g in grads.values()))
    for name, grad in grads.items():
        log.check(topic, f"gradient of {name}",
                  (packed_grads[name] - grad).abs().max() / grad.abs().max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_process_group()
    log = CheckLog(dist.get_rank(), default_limit=TOL)
    work, reference = args.work, args.work / "reference"
    if dist.get_rank() == 0:
        lines = (RECIPE.parent / "data" / "tiny_sft.jsonl").read_text().splitlines()
        (work / "data.jsonl").write_text("\n".join(lines[:EXAMPLES]) + "\n")
    dist.barrier()

    padded = ["trainer.micro_batch_size=4", f"trainer.global_batch_size={EXAMPLES}"]
    packed = ["data.packing=true", "trainer.micro_batch_size=2", "trainer.global_batch_size=8"]
    sft = ["method=sft"]
    local = ["model.attention=local"]
    compare(log, "sft", one_step(work, sft + local + padded, save_reference=reference),
            one_step(work, sft + local + packed))
    anchored = ["method=anchored", f"model.reference_checkpoint={reference}"]
    compare(log, "anchored", one_step(work, anchored + padded), one_step(work, anchored + packed))
    compare(log, "sft_pp2", one_step(work, sft + padded, tp=1, pp=2),
            one_step(work, sft + packed, tp=1, pp=2))

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, log.items)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps([item for items in everyone for item in items]))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
