"""Train a DeepSeek-V3-style MoE model, elastically, on Ray.

    python jobs/train.py                       # embedded local Ray, debug recipe, bundled corpus
    python jobs/train.py --recipe small --workers 8:64 --set train.lr=3e-4
    python jobs/train.py --recipe deepseek_v3_671b --describe
    ray job submit --working-dir . -- python jobs/train.py --recipe small --workers 8:64

With ``RAY_ADDRESS`` set (as under ``ray job submit``) or ``--ray-address`` it attaches to that
cluster; otherwise it always starts its own local Ray. Launch-time checks (Ray address, capacity,
memory, shared storage) refuse a run that cannot work before any worker starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python jobs/train.py` from a checkout, without installing
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
    if args.workers:
        low, high = parse_workers(args.workers)
        overrides += [f"parallel.min_workers={low}", f"parallel.max_workers={high}"]
    if getattr(args, "wait_for_capacity", None) is not None:
        overrides.append(f"elastic.capacity_wait_s={args.wait_for_capacity}")
    return apply_overrides(cfg, overrides)


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


def describe(cfg: Config) -> str:
    from elastic_moe.model import count_parameters

    counts = count_parameters(cfg.model)
    lines = [json.dumps(dataclasses.asdict(cfg), indent=2),
             f"total parameters: {counts.total}",
             f"activated parameters per token: {counts.activated}",
             f"MTP parameters (not in the totals above): {counts.mtp}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    parser.add_argument("--workers", help="elastic worker count MIN:MAX (or N)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.dim=128 (repeatable)")
    parser.add_argument("--data", help="manifest.json of prepared data (default: bundled corpus)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run of the same name from its last committed checkpoint")
    parser.add_argument("--run-name", help="run name (checkpoints, coordinator, MLflow run name); "
                                           "default: <recipe>-<time>, or with --resume the newest")
    parser.add_argument("--output-dir", default="outputs",
                        help="where runs keep checkpoints and coordinator state (shared storage "
                             "on a cluster)")
    parser.add_argument("--describe", action="store_true",
                        help="print the resolved config and parameter counts, then exit")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="attach to this Ray cluster (default: $RAY_ADDRESS, as `ray job "
                             "submit` sets it; without either, an embedded local Ray)")
    parser.add_argument("--wait-for-capacity", type=float, metavar="SECONDS",
                        help="on a cluster, how long to wait for MIN workers to fit before "
                             "giving up (elastic.capacity_wait_s, default 600)")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything Ray, Ray Train and MLflow print")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.describe:
        print(describe(cfg))
        return 0
    from actors.cluster import LaunchError, check_address, requested_address
    from actors.console import configure_console

    configure_console(verbose=args.verbose)
    if args.ray_address:  # what ray.init and the job's workers read
        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        address = requested_address()
        if address is None:
            from actors.preflight import check_memory_before_ray

            check_memory_before_ray(cfg)
        else:  # before preparing data: a dead address fails in seconds
            check_address(address)
        from actors.training import run_training

        run_name = choose_run_name(cfg, args.run_name, args.resume, args.output_dir)
        result = run_training(cfg, run_name=run_name, resume=args.resume,
                              output_dir=args.output_dir)
    except (ValueError, LaunchError) as exc:  # found at launch: one clear line, no traceback
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
