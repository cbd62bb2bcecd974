"""`nemo-anchored launch --executor local|slurm|sbatch --config RECIPE [key=value ...]`: both
training stages as one job, each under torchrun: the SFT reference (`sft ... method=sft`), then
Anchored Learning toward its final checkpoint (`anchor ... model.reference_checkpoint=RUN/final`).

    local   NeMo-Run on this machine, the anchor stage after the SFT stage succeeded; waits
    slurm   a NeMo-Run experiment submitted from a login node (two jobs, the second `afterok`
            the first); `--dryrun` writes the sbatch scripts and submits nothing
    sbatch  a plain Slurm batch script running both stages (no NeMo-Run needed)

NeMo-Run is the optional extra `nemo-anchored[launch]`. Both configurations are validated here,
before anything is queued. The stages run in the directory `launch` was started from, which
must be on a file system every node shares (docs/design/cluster.md, "Launch").
"""
import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from nemo_anchored.config import load_config
from nemo_anchored.errors import UserError

TEMPLATE = Path(__file__).with_name("templates") / "two_stage.sbatch"
EXTRA = "pip install 'nemo-anchored[launch]' (nemo-run==0.11.1 leptonai==0.27.3)"
# launch chooses these per stage: stage 1 is plain SFT, stage 2 anchors to its final weights,
# and each resumes from its own checkpoints (checkpoint.resume=auto): a requeued job with
# another value would start both stages over, or resume one from the other's checkpoint.
STAGE_KEYS = ("method", "model.reference_checkpoint", "checkpoint.resume")


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--executor", required=True, choices=("local", "slurm", "sbatch"))
    parser.add_argument("--config", required=True, help="recipe YAML, passed to both stages")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides for both stages, e.g. optim.lr=1e-5")
    resources = parser.add_argument_group("resources")
    resources.add_argument("--nodes", type=_at_least(1), default=1)
    resources.add_argument("--gpus-per-node", type=_at_least(1), default=1,
                           help="torchrun processes per node (one per GPU)")
    resources.add_argument("--partition")
    resources.add_argument("--account")
    resources.add_argument("--time", help="Slurm time limit of each job, e.g. 04:00:00")
    resources.add_argument("--container-image", help="run in this image (Slurm with pyxis)")
    resources.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                           help="environment of every rank, e.g. NCCL_SOCKET_IFNAME=ib0")
    resources.add_argument("--preempt-seconds", type=_at_least(1), default=300,
                           help="USR1 this long before the time limit: checkpoint, requeue")
    resources.add_argument("--max-requeues", type=_at_least(0), default=10)
    resources.add_argument("--rdzv-port", type=_at_least(1), default=29500,
                           help="the c10d rendezvous port on the first node")
    parser.add_argument("--dryrun", action="store_true",
                        help="local, slurm: show what would run, start nothing")
    parser.add_argument("--out", help="sbatch: write the script here (default: stdout)")
    return parser


def environment(args) -> dict:
    """Every rank's environment on every node: the defaults below, then each --env.
    docs/design/cluster.md says why each is set; interface names are the cluster's to give."""
    env = {
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(args.preempt_seconds),
        "PYTHONUNBUFFERED": "1",
    }
    if args.container_image:
        # The stages run in the launch directory: from a checkout, `python -m nemo_anchored`
        # would import its package (its extension built for the host, or none) over the image's.
        env["PYTHONSAFEPATH"] = "1"
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def stages(args) -> list:
    """[(name, `nemo_anchored` arguments)] of both stages, their configurations validated for
    the whole launch (nodes x GPUs processes). Stage 2's reference does not exist yet: its
    paths are checked when it starts."""
    for item in args.overrides:
        if item.partition("=")[0] in STAGE_KEYS:
            raise UserError(f"{item}: `nemo-anchored launch` sets {', '.join(STAGE_KEYS)} per "
                            f"stage; run `nemo-anchored sft` or `anchor` to choose them")
    world_size = args.nodes * args.gpus_per_node
    sft = ["method=sft", *args.overrides]
    sft_cfg = load_config(args.config, sft, world_size=world_size)
    run_dir = sft_cfg.logging.dir
    anchor = [*args.overrides, f"model.reference_checkpoint={run_dir}/final"]
    if sft_cfg.model.base_checkpoint is None:  # initialised from the seed: the same weights
        anchor.append(f"model.base_checkpoint={run_dir}/base")
    anchor_cfg = load_config(args.config, ["method=anchored", *anchor], world_size=world_size,
                             check_paths=False)
    if args.container_image:
        _check_mounted(args.config, sft_cfg)
    for key in ("logging.dir", "checkpoint.dir"):
        section, name = key.split(".")
        if sft_cfg[section][name] == anchor_cfg[section][name]:
            raise UserError(f"{key}: both stages would write to {sft_cfg[section][name]!r}; "
                            f"make it depend on the stage, e.g. logging.dir=runs/${{name}}")
    return [("sft", ["sft", "--config", args.config, *sft]),
            ("anchor", ["anchor", "--config", args.config, *anchor])]


def _check_mounted(recipe: str, cfg) -> None:
    """UserError naming the first input outside the launch directory, the one folder mounted
    into the container: the ranks would not find it there."""
    workdir = Path(os.getcwd()).resolve()
    inputs = {"--config": recipe, "data.train_path": cfg.data.train_path,
              "data.valid_path": cfg.data.valid_path, "model.base_checkpoint":
              cfg.model.base_checkpoint, "data.tokenizer": None if cfg.data.tokenizer == "byte"
              else cfg.data.tokenizer, "logging.dir": cfg.logging.dir,
              "checkpoint.dir": cfg.checkpoint.dir}
    for key, value in inputs.items():
        if value is not None and not Path(value).resolve().is_relative_to(workdir):
            raise UserError(f"{key}: {value} is outside the launch directory {workdir}, the only "
                            "folder mounted into --container-image's container; move it there "
                            "or launch from a folder that holds it")


def sbatch_script(args, env: dict) -> str:
    """The plain Slurm script (templates/two_stage.sbatch) for these arguments."""
    workdir = os.getcwd()
    site = [f"#SBATCH --{flag}={_directive_value(value)}" for flag, value in
            (("partition", args.partition), ("account", args.account), ("time", args.time))
            if value]
    container = "" if not args.container_image else (
        f"--container-image={shlex.quote(args.container_image)} "
        f"--container-mounts={shlex.quote(f'{workdir}:{workdir}')} "
        f"--container-workdir={shlex.quote(workdir)} ")
    (_, sft), (_, anchor) = stages(args)
    values = {
        "job_name": _directive_value(f"{Path(args.config).stem}.anchored"),
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "site_options": "\n".join(site), "workdir": _directive_value(workdir),
        "preempt_seconds": args.preempt_seconds, "max_requeues": args.max_requeues,
        "environment": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        "rdzv_port": args.rdzv_port, "container_options": container,
        "sft_stage": shlex.join(sft), "anchor_stage": shlex.join(anchor),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), TEMPLATE.read_text())


def _directive_value(value: str) -> str:
    """``value`` for an ``#SBATCH --flag=VALUE`` line: sbatch splits these lines on whitespace
    outside double quotes, and a line break would end the directives."""
    if "\n" in value or "\r" in value:
        raise UserError(f"{value!r}: a line break cannot go into a Slurm batch script directive")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"' if re.search(r'[\s"\\]', value) else value


def _nemo_run():
    try:
        import nemo_run
    except ImportError as error:
        raise UserError(f"--executor needs NeMo-Run, which did not import ({error}): "
                        f"{EXTRA}; or use --executor sbatch") from None
    return nemo_run


def _executor(run, args, env: dict):
    if args.executor == "local":
        if args.nodes != 1:
            raise UserError(f"--nodes {args.nodes}: the local executor runs on this machine only")
        # The torchrun next to this interpreter, so that the stages run in this environment.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        return run.LocalExecutor(ntasks_per_node=args.gpus_per_node, launcher=run.Torchrun(),
                                 env_vars={**env, "PATH": path})
    workdir = os.getcwd()
    return run.SlurmExecutor(
        account=args.account, partition=args.partition, time=args.time,
        nodes=args.nodes, ntasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
        container_image=args.container_image,
        container_mounts=[f"{workdir}:{workdir}"] if args.container_image else [],
        # NeMo-Run's script requeues a job whose step failed while retries remain; USR1 goes to
        # the torchrun agents, which pass it on to the ranks (PET_SIGNALS_TO_HANDLE).
        signal=f"USR1@{args.preempt_seconds}", retries=args.max_requeues,
        additional_parameters={"requeue": True}, job_name_prefix=f"{Path(args.config).stem}.",
        # Each task's code directory becomes a link to the launch directory: the stages run
        # there, on the shared file system, instead of in a copy of the repository.
        packager=run.GitArchivePackager(symlink_from_remote_dir=workdir),
        launcher=run.Torchrun(rdzv_port=args.rdzv_port),
        # The generated script writes `export KEY=VALUE` lines unquoted.
        env_vars={k: shlex.quote(v) for k, v in env.items()})


def _run_experiment(run, args, env: dict, stage_list: list) -> int:
    if args.executor == "local" and not args.dryrun:
        # One experiment per stage, the second only after the first succeeded: NeMo-Run's local
        # scheduler starts a dependent task even when the one before failed, and the anchor
        # stage would then train toward an earlier run's final weights.
        for stage in stage_list:
            _experiment(run, args, env, [stage], f"{Path(args.config).stem}.{stage[0]}")
        return 0
    return _experiment(run, args, env, stage_list, Path(args.config).stem)


def _experiment(run, args, env: dict, stage_list: list, title: str) -> int:
    with run.Experiment(title, executor=_executor(run, args, env),
                        log_level="WARN") as experiment:
        previous = []
        for name, arguments in stage_list:
            previous = [experiment.add(
                run.Script(path="nemo_anchored", m=True, entrypoint="python", args=arguments),
                name=name, dependencies=previous)]
        if args.dryrun:
            experiment.dryrun(delete_exp_dir=False)
            return 0
        experiment.run(detach=args.executor == "slurm")
        if args.executor == "slurm":
            return 0
    # Leaving the block waited for the stages (a lone task's run() returns once it started).
    for job in experiment.jobs:
        if job.state.name != "SUCCEEDED":
            raise UserError(f"stage {job.id} ended {job.state.name}; its logs are under "
                            f"{job.executor.job_dir}")
    return 0


def run(args) -> int:
    env = environment(args)
    if args.executor == "sbatch":
        script = sbatch_script(args, env)
        if args.out:
            out = Path(args.out)
            if not out.parent.is_dir():
                raise UserError(f"--out {args.out}: the folder {out.parent} does not exist")
            out.write_text(script)
        else:
            sys.stdout.write(script)
        return 0
    return _run_experiment(_nemo_run(), args, env, stages(args))
