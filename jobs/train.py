"""Train a DeepSeek-V3-style MoE model, elastically, on Ray.

    python jobs/train.py                       # embedded local Ray, debug recipe, bundled corpus
    python jobs/train.py --recipe small --workers 8:64 --set train.lr=3e-4
    python jobs/train.py --recipe deepseek_v3_671b --describe
    python jobs/train.py --recipe deepseek_v3_671b --init-dry-run 256   # init bytes per rank
    python jobs/train.py --init-from hf-model/ --data prepared/manifest.json --steps 100
    ray job submit --working-dir . -- python jobs/train.py --recipe small --workers 8:64
    python jobs/train.py --run-name NAME --stop   # stop a live run after saving its current step

With ``RAY_ADDRESS`` set (as under ``ray job submit``) or ``--ray-address`` it attaches to that
cluster; otherwise it always starts its own local Ray. Launch-time checks (Ray address, capacity,
memory, shared storage) refuse a run that cannot work before any worker starts. The run is driven
by its coordinator actor, not by this process: on a cluster, this process may die, and the same
command (same ``--run-name``) attaches to the live run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python jobs/train.py` from a checkout, without installing: put the checkout on sys.path. Never
# for an installed copy, whose parent folder is site-packages/elastic_moe.
if os.path.isfile(os.path.join(ROOT, "pyproject.toml")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from elastic_moe.config import RECIPES, Config, apply_overrides, get_recipe  # noqa: E402


def parse_workers(text: str) -> tuple[int, int]:
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":", 1))
        else:
            low = high = int(text)
    except ValueError:
        raise ValueError(f"--workers {text!r}: expected N or MIN:MAX, e.g. 2:4") from None
    if low < 1 or high < low:
        raise ValueError(f"--workers {text!r}: need 1 <= MIN <= MAX")
    return low, high


def build_config(args: argparse.Namespace) -> Config:
    cfg = get_recipe(args.recipe)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.data:
        overrides.append(f"data.manifest={args.data}")
    if args.val_data:
        overrides.append(f"data.val_manifest={args.val_data}")
    if args.workers:
        low, high = parse_workers(args.workers)
        overrides += [f"parallel.min_workers={low}", f"parallel.max_workers={high}"]
    if getattr(args, "wait_for_capacity", None) is not None:
        overrides.append(f"elastic.capacity_wait_s={args.wait_for_capacity}")
    cfg = apply_overrides(cfg, overrides)
    if args.init_from:
        cfg = model_from_checkpoint(cfg, args.init_from, overrides)
    return cfg


def model_from_checkpoint(cfg: Config, path: str, overrides: list[str]) -> Config:
    """``cfg`` with the model section from ``path/config.json`` and ``checkpoint.init_from``;
    training settings (and the model's training choices) keep the recipe's and --set values."""
    from elastic_moe.model.hf_sharded import TRAINING_CHOICES, hf_config_to_model_config

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key.removeprefix("model.") not in TRAINING_CHOICES:
            raise ValueError(f"--set {key}: with --init-from the model comes from "
                             f"{path.rstrip('/')}/config.json; only model."
                             f"{{{','.join(TRAINING_CHOICES)}}} can be overridden")
    choices = {name: getattr(cfg.model, name) for name in TRAINING_CHOICES}
    model = hf_config_to_model_config(path, **choices)
    return dataclasses.replace(cfg, model=model,
                               checkpoint=dataclasses.replace(cfg.checkpoint, init_from=path))


def check_init_from(init_from: str | None, resume: bool, run_dir: str) -> None:
    """``--init-from`` starts new runs only: never with ``--resume`` or on an existing run."""
    if not init_from:
        return
    if resume:
        raise ValueError("--init-from with --resume: --resume continues a run from its own "
                         "checkpoints, --init-from starts a new run from published weights; "
                         "drop one of them")
    if os.path.exists(os.path.join(run_dir, "coordinator.json")):
        raise ValueError(f"--init-from: run {os.path.basename(run_dir)!r} already exists in "
                         f"{run_dir}; a run takes its starting weights once, when it is created "
                         "(restarts restore its own checkpoints): give a new --run-name")


def init_dry_run(cfg: Config, world_size: int) -> str:
    """Per-rank parameter bytes after init at ``world_size``, from shapes alone (no allocation)."""
    from elastic_moe.parallel.memory import init_bytes_per_rank
    from elastic_moe.parallel.mesh import plan_mesh

    plan = plan_mesh(world_size, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    return "\n".join([plan.describe(), init_bytes_per_rank(cfg.model, plan).describe()])


def choose_run_name(cfg: Config, run_name: str | None, resume: bool, output_dir: str) -> str:
    """An explicit name wins; a new run gets ``<recipe>-<time>``; ``--resume`` alone continues
    the newest run of this recipe in ``output_dir``."""
    if run_name:
        return run_name
    if not resume:
        return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = sorted((os.path.getmtime(os.path.join(output_dir, d)), d)
                  for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                  if d.startswith(cfg.name + "-")
                  and os.path.exists(os.path.join(output_dir, d, "coordinator.json")))
    if not runs:
        raise ValueError(f"--resume: no earlier {cfg.name!r} run in {output_dir}; "
                         "give --run-name")
    return runs[-1][1]


def running_run(cfg: Config, output_dir: str) -> str | None:
    """The newest run of this recipe in ``output_dir`` whose record says it is running (it may
    be live: a launcher given no run name attaches to it rather than start another)."""
    runs = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name, "coordinator.json")
        if not name.startswith(cfg.name + "-") or not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                status = json.load(f).get("status")
        except (OSError, ValueError):
            continue
        if status == "RUNNING":
            runs.append((os.path.getmtime(path), name))
    return max(runs)[1] if runs else None


def describe(cfg: Config, world_size: int | None = None) -> str:
    """The resolved config and parameter counts; with ``world_size`` (``--workers``), also each
    worker's training state, the memory held for redundancy, the bytes copied per step and the
    losses survived without storage."""
    from elastic_moe.model import count_parameters

    counts = count_parameters(cfg.model)
    lines = [json.dumps(dataclasses.asdict(cfg), indent=2),
             f"total parameters: {counts.total}",
             f"activated parameters per token: {counts.activated}",
             f"MTP parameters (not in the totals above): {counts.mtp}"]
    if world_size is not None:
        from elastic_moe.train.redundancy import redundancy_report

        lines.append(redundancy_report(cfg, world_size).describe())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    parser.add_argument("--workers", help="elastic worker count MIN:MAX (or N)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.dim=128 (repeatable)")
    parser.add_argument("--data", help="manifest.json of prepared data (default: bundled corpus)")
    parser.add_argument("--val-data", metavar="MANIFEST",
                        help="validation manifest for train.eval_every (default: the split "
                             "prepare_data.py --val-fraction wrote beside --data)")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start a new run from HF-layout weights (directory or fsspec URL: "
                             "config.json + safetensors); the model section comes from its "
                             "config.json")
    parser.add_argument("--init-dry-run", type=int, metavar="WORLD_SIZE",
                        help="print the per-rank bytes of the initialised model at this world "
                             "size (nothing is allocated), then exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run of the same name from its last committed checkpoint")
    parser.add_argument("--stop", action="store_true",
                        help="stop the live run (--run-name, default: the newest of this recipe) "
                             "at its next step boundary, after saving that step; --resume "
                             "continues it")
    parser.add_argument("--run-name", help="run name (checkpoints, coordinator, MLflow run name); "
                                           "default: <recipe>-<time>, or with --resume the newest")
    parser.add_argument("--output-dir", default="outputs",
                        help="where runs keep checkpoints and coordinator state (shared storage "
                             "on a cluster)")
    parser.add_argument("--describe", action="store_true",
                        help="print the resolved config and parameter counts, then exit; with "
                             "--workers, also the memory and copies of redundancy per worker at "
                             "the largest size")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="attach to this Ray cluster (default: $RAY_ADDRESS, as `ray job "
                             "submit` sets it; without either, an embedded local Ray)")
    parser.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                        # the default is actors.cluster.DEFAULT_CONNECT_TIMEOUT_S (importing
                        # it here would import ray for --help)
                        help="with a Ray address, how long to keep trying to reach it before "
                             "giving up (default 15; a head node that is still starting "
                             "refuses connections for a while)")
    parser.add_argument("--wait-for-capacity", type=float, metavar="SECONDS",
                        help="on a cluster, how long to wait for MIN workers to fit before "
                             "giving up (elastic.capacity_wait_s, default 600)")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything Ray and MLflow print")
    args = parser.parse_args(argv)
    if args.connect_timeout is not None and not 0 < args.connect_timeout < float("inf"):
        parser.error(f"--connect-timeout {args.connect_timeout:g}: must be a number of seconds "
                     "more than 0")
    try:
        cfg = build_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.describe:
        try:
            print(describe(cfg, cfg.parallel.max_workers if args.workers else None))
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    if args.init_dry_run is not None:
        try:
            print(init_dry_run(cfg, args.init_dry_run))
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    from elastic_moe.actors.cluster import (
        DEFAULT_CONNECT_TIMEOUT_S,
        LaunchError,
        check_address,
        requested_address,
    )
    from elastic_moe.actors.console import configure_console

    configure_console(verbose=args.verbose)
    if args.ray_address:  # what ray.init and the job's workers read
        os.environ["RAY_ADDRESS"] = args.ray_address
    address = requested_address()
    connect_timeout_s = args.connect_timeout or DEFAULT_CONNECT_TIMEOUT_S
    try:
        if address is None:
            from elastic_moe.actors.preflight import check_memory_before_ray

            check_memory_before_ray(cfg)
        else:  # before preparing data: a dead address fails in seconds
            check_address(address, connect_timeout_s)
        from elastic_moe.actors.training import run_training, stop_training

        run_name = choose_run_name(cfg, args.run_name, args.resume or args.stop,
                                   args.output_dir)
        if args.stop:
            result = stop_training(cfg, run_name, output_dir=args.output_dir,
                                   connect_timeout_s=connect_timeout_s)
        else:
            check_init_from(args.init_from, args.resume, os.path.join(args.output_dir, run_name))
            # no run name on a cluster: the newest running run of the recipe, if it is live
            attach_to = (running_run(cfg, args.output_dir)
                         if not (args.run_name or args.resume or args.init_from)
                         and address is not None else None)
            result = run_training(cfg, run_name=run_name, resume=args.resume,
                                  output_dir=args.output_dir, attach_to=attach_to,
                                  connect_timeout_s=connect_timeout_s)
    except (ValueError, LaunchError) as exc:  # found at launch: one clear line, no traceback
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if address is None:  # the embedded Ray ends with this process, and the run with it
            print("train.py: interrupted; the embedded Ray stops with this process. Continue "
                  "the run with --resume", file=sys.stderr)
        else:  # the run goes on in its coordinator
            print("train.py: stopped following; the run goes on. Attach again with the same "
                  "command, or stop it with --stop --run-name NAME", file=sys.stderr)
        return 130
    print(result.summary())
    return 0 if result.ok else result.exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
