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
from nemo_anchored.lab.records import differences
from nemo_anchored.lab.report import write_report


class ShardMergeError(RuntimeError, UserError):
    """The shards are not the parts of one lab."""


def _read(shard: Path) -> dict:
    path = shard / "results.json"
    if not path.is_file():
        raise ShardMergeError(f"{shard}: no results.json: that shard's lab has not finished "
                              "(run its command again to continue it)")
    return json.loads(path.read_text())


def merge_shards(out: Path, shards: Sequence[Path], log=print) -> dict:
    """Write OUT/results.json, results.md and pareto.png / .pdf of the lab whose seed shards'
    output directories are ``shards``; returns the results."""
    parts = sorted(((shard, _read(shard)) for shard in shards),
                   key=lambda part: part[1]["config"]["seeds"][0])
    first_dir, first = parts[0]

    def settings(results: dict) -> dict:
        return {k: v for k, v in results["config"]["settings"].items() if k != "seed_indices"}

    for shard, results in parts[1:]:
        changed = differences(settings(first), settings(results))
        if changed:
            raise ShardMergeError(f"{shard} ran other settings than {first_dir} "
                                  f"({'; '.join(changed)}): not shards of one lab")
        if weight_digests(results["config"]["base_sha256"]) \
                != weight_digests(first["config"]["base_sha256"]):
            raise ShardMergeError(f"{shard} started from another p_base than {first_dir} "
                                  "(the SHA-256 of its weights differ): its seeds are not "
                                  "comparable; run every shard from the committed base")
    seeds: List[int] = [seed for _, results in parts for seed in results["config"]["seeds"]]
    expected = [1000 + i for i in range(first["config"]["settings"]["seeds"])]
    if sorted(seeds) != expected:
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        missing = sorted(set(expected) - set(seeds))
        raise ShardMergeError(
            f"the shards' seeds {sorted(seeds)} are not each of the lab's seeds {expected} once"
            + (f"; in two shards: {twice}" if twice else "")
            + (f"; in none: {missing} (run the shard with --seed-index "
               f"{' '.join(str(s - 1000) for s in missing)})" if missing else ""))

    config = {k: v for k, v in first["config"].items()
              if k not in ("wall_time_s", "jobs", "machine", "run_time_s")}
    config["settings"] = {**first["config"]["settings"], "seed_indices": None}
    config["seeds"] = expected
    config["run_time_s"] = {name: time for _, results in parts
                            for name, time in results["config"]["run_time_s"].items()}
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
        first["base"], joined("failed_runs", lambda f: f["run"].split("/")[0]), config, log)
    log(f"\nlab: {len(results['points'])} points of seeds {expected} from {len(parts)} "
        f"shards; {Path(out) / 'results.json'}, {Path(out) / 'pareto.png'} (and .pdf)")
    return results
