"""One lab from its seed shards: the results of labs that ran the same settings, each on some of
the seeds (`nemo-anchored lab --seed-index I ...`), joined as the whole lab would have written
them (`nemo-anchored lab --merge SHARD... --out OUT`).

A lab's seeds are independent: each seed's trainings start from the same p_base and depend only
on that seed's own SFT references, so a shard computes exactly its seeds' part of the whole
lab. What must hold for the union to be one lab, and is checked: every shard finished (its
results.json exists), the same settings but for ``seed_indices``, the same base weights (SHA-256
of its tensor files: the committed base makes that so on every machine), and every seed in
exactly one shard. A shard's failed trainings stay failed in the merged lab, as they would in
the whole one.

The merged config records, per shard, its directory, seeds, wall time, trainings at a time and
machine: shards may run on different machines, so their times are not comparable.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

from nemo_anchored.errors import UserError
from nemo_anchored.lab.base import weight_digests
from nemo_anchored.lab.records import differences, seed_of_training
from nemo_anchored.lab.report import write_report
from nemo_anchored.lab.settings import LabSettings


class ShardMergeError(RuntimeError, UserError):
    """The shards are not the parts of one lab."""


# Settings that say how or where a shard ran, not what it computed: which seeds, whether step
# checkpoints were kept, and the base's path on that machine (its weights are compared instead).
_PER_SHARD = ("seed_indices", "keep_checkpoints", "base_checkpoint")
# What a finished lab's results.json holds that the merge needs (a lab of an older version may
# lack some: it cannot be a shard).
_NEEDED = ("seeds", "settings", "base_sha256", "machine", "wall_time_s", "jobs", "run_time_s")


def _read(shard: Path) -> dict:
    path = shard / "results.json"
    if not path.is_file():
        raise ShardMergeError(f"{shard}: no results.json: that shard's lab has not finished "
                              "(run its command again to continue it)")
    try:
        results = json.loads(path.read_text())
        missing = [key for key in _NEEDED if key not in results["config"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ShardMergeError(f"{path}: not a lab's results ({error!r})") from None
    if missing:
        raise ShardMergeError(f"{path}: config lacks {missing}: written by a version of the lab "
                              "that ran no shards; run that shard again")
    return results


def merge_shards(out: Path, shards: Sequence[Path], log=print) -> dict:
    """Write OUT/results.json, results.md and pareto.png / .pdf of the lab whose seed shards'
    output directories are ``shards``; returns the results."""
    if any(Path(out).resolve() == Path(shard).resolve() for shard in shards):
        raise ShardMergeError(f"--out {out} is one of the shards: the merge would overwrite its "
                              "results; write the merged lab elsewhere")
    parts = sorted(((shard, _read(shard)) for shard in shards),
                   key=lambda part: part[1]["config"]["seeds"][0])
    first_dir, first = parts[0]

    def settings(results: dict) -> dict:
        return {k: v for k, v in results["config"]["settings"].items() if k not in _PER_SHARD}

    for shard, results in parts[1:]:
        changed = differences(settings(first), settings(results))
        if changed:
            raise ShardMergeError(f"{shard} ran other settings than {first_dir} (then: "
                                  f"{first_dir}, now: {shard}; {'; '.join(changed)}): not "
                                  "shards of one lab")
        if weight_digests(results["config"]["base_sha256"]) \
                != weight_digests(first["config"]["base_sha256"]):
            raise ShardMergeError(f"{shard} started from another p_base than {first_dir} "
                                  "(the SHA-256 of its weights differ): its seeds are not "
                                  "comparable; run every shard from the committed base")
    seeds: List[int] = [seed for _, results in parts for seed in results["config"]["seeds"]]
    expected = LabSettings(seeds=first["config"]["settings"]["seeds"]).seed_values()
    if sorted(seeds) != expected:
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        missing = sorted(set(expected) - set(seeds))
        raise ShardMergeError(
            f"the shards' seeds {sorted(seeds)} are not each of the lab's seeds {expected} once"
            + (f"; in two shards: {twice}" if twice else "")
            + (f"; in none: {missing} (run the shard with --seed-index "
               f"{' '.join(str(expected.index(s)) for s in missing)})" if missing else ""))

    config = {k: v for k, v in first["config"].items()
              if k not in ("wall_time_s", "jobs", "machine", "run_time_s")}
    config["settings"] = {**first["config"]["settings"], "seed_indices": None}
    config["seeds"] = expected
    # Seed by seed, as the whole lab orders them (the pretraining, if a shard ran one, first).
    times = [item for _, results in parts for item in results["config"]["run_time_s"].items()]
    config["run_time_s"] = dict(sorted(times, key=lambda kv: -1 if "/" not in kv[0]
                                       else seed_of_training(kv[0])))
    config["shards"] = [{"dir": str(shard), "seeds": results["config"]["seeds"],
                         "wall_time_s": results["config"]["wall_time_s"],
                         "jobs": results["config"]["jobs"],
                         "machine": results["config"]["machine"],
                         "base_scores": results["base"]} for shard, results in parts]

    def joined(key: str, seed_of=lambda entry: entry["seed"]) -> List[dict]:
        """The shards' entries in the whole lab's order: seed by seed (a stable sort keeps
        each seed's plan order), whichever shard ran which seeds."""
        return sorted((entry for _, r in parts for entry in r[key]), key=seed_of)

    Path(out).mkdir(parents=True, exist_ok=True)
    results = write_report(
        Path(out), joined("points"), joined("point_details"), joined("references"),
        first["base"], joined("failed_runs", lambda f: seed_of_training(f["run"])), config, log)
    log(f"\nlab: {len(results['points'])} points of seeds {expected} from {len(parts)} "
        f"shards; {Path(out) / 'results.json'}, {Path(out) / 'pareto.png'} (and .pdf)")
    return results
