"""Runs training configurations for tests/test_training.py, several per process launch.

    python tests/training_worker.py SPEC.json                   # a world of one process
    torchrun --nproc_per_node=2 tests/training_worker.py SPEC.json

SPEC.json: {"runs": [{"name": ..., "tp": 1, "pp": 1, "overrides": [...]}, ...], "out": DIR}.
Each run trains recipes/tiny_cpu.yaml with its overrides in its own layout (megatron's groups
are re-initialised between runs; process start-up is what costs seconds here). Per run, rank 0
writes OUT/NAME.json with what the tests compare: the step records of metrics.jsonl, and after
every step a fingerprint of the snapshot and of the policy (to see exactly when the snapshot
changes) plus the number of resident models. A run with "expect_error": true is one that must
stop: OUT/NAME.json then holds {"errors": [...]}, what each rank raised (null: nothing).
"""
import json
import os
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_anchored.config import load_config
from nemo_anchored.parallel.distributed import init_process_group, model_parallel
from nemo_anchored.training.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def fingerprint(model) -> float:
    """A float64 digest of the model's weights, the same in every parallel layout.

    Each weight counts once: tensor-parallel shards on every TP rank, replicated parameters on
    TP rank 0, data-parallel replicas on DP rank 0 only, and a last stage's copy of the tied
    embedding not at all. Each tensor is weighted by a number derived from its global name.
    """
    from megatron.core import parallel_state as ps

    from nemo_anchored.models.gpt import full_state_dict_key

    total = torch.zeros((), dtype=torch.float64)
    if ps.get_data_parallel_rank() == 0:
        for name, p in model.named_parameters():
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                continue
            if not getattr(p, "tensor_model_parallel", False) and \
                    ps.get_tensor_model_parallel_rank() != 0:
                continue
            weight = 1 + zlib.crc32(full_state_dict_key(model, name).encode()) % 97 / 97
            total += p.detach().double().sum() * weight
    dist.all_reduce(total)
    return total.item()


class RecordingTrainer(Trainer):
    """The real Trainer; after each step it also notes the snapshot's and policy's weights."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.trace = []

    def _train_step(self, pos, optimizer, scheduler):
        super()._train_step(pos, optimizer, scheduler)
        snapshot = self.stack.snapshot
        self.trace.append({"step": pos.global_step + 1, "outer": pos.outer,
                           "policy": fingerprint(self.stack.policy),
                           "snapshot": None if snapshot is None else fingerprint(snapshot)})


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(1)
    init_process_group()
    world = dist.get_world_size()
    for run in spec["runs"]:
        cfg = load_config(RECIPE, run["overrides"], world_size=world)
        error = None
        with model_parallel(run.get("tp", 1), run.get("pp", 1), seed=cfg.trainer.seed) as ctx:
            trainer = RecordingTrainer(cfg, ctx)
            try:
                trainer.fit()
            except Exception as raised:
                if not run.get("expect_error"):
                    raise
                error = f"{type(raised).__name__}: {raised}"
            resident = 1 + len(trainer.stack.frozen_models)
        if run.get("expect_error"):
            errors = [None] * world
            dist.all_gather_object(errors, error)
            if dist.get_rank() == 0:
                (out / f"{run['name']}.json").write_text(json.dumps({"errors": errors}))
        elif dist.get_rank() == 0:
            metrics = [json.loads(line) for line in
                       (Path(cfg.logging.dir) / "metrics.jsonl").read_text().splitlines()]
            (out / f"{run['name']}.json").write_text(json.dumps({
                "metrics": metrics, "trace": trainer.trace, "resident_models": resident,
                "final": str(Path(cfg.logging.dir) / "final")}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
