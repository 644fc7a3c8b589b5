"""The CUDA path of the training service, end to end on one GPU, in three recorded phases.

    python benchmarks/gpu_service.py --out results/gpu_service              # CUDA, NCCL
    python benchmarks/gpu_service.py --dry-run --out /tmp/gpu_service       # CPU, gloo, debug

a. ``jobs/train.py`` on one worker (world size 1) with a cut-down ``small`` recipe for a few
   steps; the MLflow run must show the loss falling and an ``mfu`` metric.
b. In process, as a live recovery does it: K steps, take the rank's shards, abort the process
   group's communicators from another thread, destroy and re-init the group on a fresh port,
   rebuild the trainer, restore the shards and run two more steps; the step counter must be K
   again, and losses and weights must equal a fault-free run (the max abs difference is reported;
   a non-zero one passes only when two fault-free runs differ by as much).
c. ``jobs/train.py`` checkpointing every 2 steps, ``kill -9`` of its training worker and driver
   after the first committed checkpoint, then ``--resume``: it must reach the last step, the
   loss must fall over the MLflow history, and no step may be missing from it.

Each phase is written to ``--out`` (gpu_service.md / gpu_service.json) as soon as it ends; a
phase that fails is recorded and the next one still runs. ``--time-limit-s`` bounds the whole
script: phases that no longer fit are recorded as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRAIN = os.path.join(ROOT, "jobs", "train.py")

# The small recipe's layer widths (dim 2048, MLA, expert width 1408, top-6), cut to 2 layers and
# 16 experts so a few steps take seconds; the 2048-token BPE trains on the bundled corpus offline,
# and a 4096 vocab keeps each checkpoint (fp32 weights + Adam) near 5 GB.
GPU_CUT = ["model.num_layers=2", "model.num_routed_experts=16", "model.vocab_size=4096",
           "data.tokenizer_vocab_size=2048", "train.seq_len=512", "train.global_batch_size=8",
           "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=0"]
DRY_CUT = ["train.eval_every=0"]  # the debug recipe is already tiny


def require(module: str) -> None:
    """One clear line instead of a traceback when the service's dependencies are missing."""
    try:
        __import__(module)
    except ImportError as exc:
        raise SystemExit(f"gpu_service.py: cannot import {module!r} ({exc}); install it "
                         f"(pip install {module}) or put its wheel on PYTHONPATH") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tracking_uri(directory: str) -> str:
    """sqlite (what the service defaults to) when SQLAlchemy is there, else a file store."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return "file:" + os.path.join(directory, "mlruns")
    return "sqlite:///" + os.path.join(directory, "mlflow.db")


class Report:
    """Phase results, rewritten to ``out`` after every phase so a cut-off run keeps its findings."""

    def __init__(self, out: str, device: str, settings: dict[str, Any]) -> None:
        self.out, self.device, self.settings = out, device, settings
        self.phases: list[dict[str, Any]] = []
        os.makedirs(out, exist_ok=True)

    def add(self, phase: dict[str, Any]) -> None:
        self.phases.append(phase)
        print(f"[{phase['phase']}] {phase['status']}: {phase.get('summary', '')}", flush=True)
        self.write()

    def table(self) -> str:
        lines = [f"# gpu_service on {self.device}", "",
                 "| phase | status | seconds | summary |", "|---|---|---|---|"]
        for p in self.phases:
            summary = str(p.get("summary", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {p['phase']} | {p['status']} | {p.get('seconds', 0):.1f} | {summary} |")
        return "\n".join(lines)

    def write(self) -> None:
        with open(os.path.join(self.out, "gpu_service.json"), "w") as f:
            json.dump({"device": self.device, "settings": self.settings, "phases": self.phases},
                      f, indent=2, default=str)
        details = "\n\n".join(f"## {p['phase']}\n\n```json\n{json.dumps(p, indent=2, default=str)}"
                              f"\n```" for p in self.phases)
        with open(os.path.join(self.out, "gpu_service.md"), "w") as f:
            f.write(self.table() + "\n\n" + details + "\n")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# --------------------------------------------------------------------------------------------
# jobs/train.py runs (phases a and c)


@dataclasses.dataclass
class Service:
    recipe: str
    overrides: list[str]
    work: str  # run outputs, data cache and MLflow store of this script
    uri: str
    experiment: str = "gpu-service"

    def command(self, run_name: str, steps: int, extra: list[str], resume: bool = False) -> list[str]:
        cmd = [sys.executable, TRAIN, "--recipe", self.recipe, "--steps", str(steps),
               "--workers", "1", "--run-name", run_name,
               "--output-dir", os.path.join(self.work, "runs")]
        sets = [f"tracking.tracking_uri={self.uri}", f"tracking.experiment={self.experiment}",
                f"data.cache_dir={os.path.join(self.work, 'data')}", *self.overrides, *extra]
        for item in sets:
            cmd += ["--set", item]
        return cmd + (["--resume"] if resume else [])

    def history(self, run_name: str, key: str) -> list[tuple[int, float]]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            raise RuntimeError(f"MLflow experiment {self.experiment!r} missing in {self.uri}")
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.runName` = '{run_name}'")
        if len(runs) != 1:
            raise RuntimeError(f"expected one MLflow run named {run_name!r}, found {len(runs)}")
        return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))


def run_logged(cmd: list[str], log_path: str, timeout: float) -> int:
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{cmd[1]} ran past {timeout:.0f} s (log {log_path})") from None


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def check_history(svc: Service, run_name: str, steps: int) -> dict[str, Any]:
    loss = svc.history(run_name, "loss")
    mfu = svc.history(run_name, "mfu")
    logged = [s for s, _ in loss]
    missing = sorted(set(range(1, steps + 1)) - set(logged))
    result = {"loss_first": loss[0][1] if loss else None, "loss_last": loss[-1][1] if loss else None,
              "loss_steps": len(logged), "last_step": max(logged, default=0),
              "missing_steps": missing, "duplicate_steps": len(logged) - len(set(logged)),
              "mfu_points": len(mfu),
              "mfu_median": statistics.median(v for _, v in mfu) if mfu else None}
    checks = {"loss falls": bool(loss) and loss[-1][1] < loss[0][1],
              "mfu logged": bool(mfu),
              "reaches last step": result["last_step"] == steps,
              "no step missing": not missing}
    return {**result, "checks": checks}


def phase_train(svc: Service, steps: int, budget: Budget) -> dict[str, Any]:
    run_name = f"service-{int(time.time())}"
    log = os.path.join(svc.work, "a_train.log")
    code = run_logged(svc.command(run_name, steps, []), log, budget.left())
    if code != 0:
        return {"status": "FAIL", "summary": f"jobs/train.py exited {code}", "log_tail": tail(log)}
    result = check_history(svc, run_name, steps)
    ok = all(result["checks"].values())
    mfu = result["mfu_median"]
    summary = (f"loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} over "
               f"{result['loss_steps']} steps; median MFU "
               + (f"{mfu:.2%}" if mfu is not None else "missing"))
    return {"status": "PASS" if ok else "FAIL", "summary": summary, "run_name": run_name,
            "log": log, **result}


def descendants(pid: int) -> dict[int, str]:
    """Every process under ``pid`` (the embedded Ray's daemons and workers): pid -> command."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            children.setdefault(int(parts[1]), []).append((int(parts[0]),
                                                           parts[2] if len(parts) > 2 else ""))
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child, args in children.get(stack.pop(), []):
            if child not in found:
                found[child] = args
                stack.append(child)
    return found


def committed_steps(checkpoint_dir: str) -> list[int]:
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(d.removeprefix("step_")) for d in os.listdir(checkpoint_dir)
                  if d.startswith("step_") and os.path.exists(os.path.join(checkpoint_dir, d,
                                                                           "COMMITTED")))


def phase_kill_resume(svc: Service, steps: int, budget: Budget, ray_stop: bool) -> dict[str, Any]:
    run_name = f"resume-{int(time.time())}"
    log = os.path.join(svc.work, "c_train.log")
    extra = ["checkpoint.every_steps=2", "checkpoint.async_save=false", "checkpoint.keep_last=2"]
    ckpt_dir = os.path.join(svc.work, "runs", run_name, "checkpoints")
    cmd = svc.command(run_name, steps, extra)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                  start_new_session=True)
    while True:
        done = committed_steps(ckpt_dir)
        workers = {p: a for p, a in descendants(driver.pid).items() if "ray::TrainWorker" in a}
        if done and workers:
            break
        if driver.poll() is not None:
            return {"status": "FAIL", "log_tail": tail(log),
                    "summary": f"driver exited {driver.returncode} before a committed checkpoint"}
        if budget.left() < 30:
            os.killpg(driver.pid, signal.SIGKILL)
            return {"status": "FAIL", "summary": "no committed checkpoint within the time limit"}
        time.sleep(0.2)
    tree = descendants(driver.pid)
    for pid in [*workers, driver.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone: the check below still needs it unfinished
            pass
    driver.wait()
    killed: dict[str, Any] = {"train_worker_pids": sorted(workers), "driver_pid": driver.pid,
              "committed_at_kill": done}
    time.sleep(1.0)
    leftovers = [p for p in tree if os.path.exists(f"/proc/{p}")]
    for pid in leftovers:  # the embedded Ray this driver started: ours, ended by id
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed["leftover_pids_killed"] = len(leftovers)
    killed["committed_after_kill"] = committed = committed_steps(ckpt_dir)
    resume_from = len(read_text(log))
    if ray_stop:
        # the module, not the `ray` script: Ray may come from PYTHONPATH without one on PATH
        stop = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                              capture_output=True, text=True)
        killed["ray_stop_rc"] = stop.returncode
    code = run_logged(svc.command(run_name, steps, extra, resume=True), log, budget.left())
    if code != 0:
        return {"status": "FAIL", "summary": f"--resume exited {code}", "log_tail": tail(log),
                **killed}
    result = check_history(svc, run_name, steps)
    match = re.search(r"resuming run \S+ from step (\d+)", read_text(log)[resume_from:])
    result["resumed_from_step"] = int(match.group(1)) if match else None
    result["checks"]["killed after a checkpoint, before the end"] = max(committed) < steps
    result["checks"]["resumed from the last committed checkpoint"] = (
        result["resumed_from_step"] == max(committed))
    ok = all(result["checks"].values())
    summary = (f"killed at committed step {max(committed)}, resumed from step "
               f"{result['resumed_from_step']} to step {result['last_step']}/"
               f"{steps}; loss {result['loss_first']:.4f} -> {result['loss_last']:.4f}; "
               f"missing steps {result['missing_steps'] or 'none'}")
    return {"status": "PASS" if ok else "FAIL", "summary": summary, "run_name": run_name,
            "log": log, **killed, **result}


# --------------------------------------------------------------------------------------------
# in-place abort and rebuild (phase b)


class SyntheticBatches:
    """A :class:`~elastic_moe.train.trainer.BatchSource` whose batch is a pure function of the
    data position, so a restored trainer sees exactly the batches the fault-free one saw."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_sequences = 10_000
        self.last_wait_s = 0.0
        self.global_batch = 1
        self.position: Any = None

    def request(self, position: Any) -> None:
        self.position = position

    def take(self) -> dict[str, Any]:
        import torch

        key = json.dumps(self.position.to_dict(), sort_keys=True).encode()
        gen = torch.Generator().manual_seed(zlib.crc32(key))
        tokens = torch.randint(0, self.vocab_size, (self.global_batch, self.seq_len + 1),
                               generator=gen)
        start = self.position.index
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
                "sample_ids": [(self.position.epoch, start + i) for i in range(self.global_batch)]}


def init_group(backend: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))


def build_trainer(cfg: Any, device: Any, ckpt_dir: str) -> Any:
    from elastic_moe.checkpoint import Checkpointer
    from elastic_moe.parallel.mesh import plan_mesh
    from elastic_moe.train.trainer import Trainer

    plan = plan_mesh(1, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.seq_len)
    trainer = Trainer(cfg, rank=0, plan=plan, device=device,
                      checkpointer=Checkpointer(ckpt_dir, async_save=False), batches=batches)
    batches.global_batch = trainer.global_batch
    return trainer


def run_steps(trainer: Any, count: int) -> list[float]:
    trainer.start_stream()
    return [trainer.train_one_step().metrics["loss"] for _ in range(count)]


def weights(trainer: Any) -> dict[str, Any]:
    return {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def phase_rebuild(recipe: str, overrides: list[str], k: int, backend: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from elastic_moe.config import apply_overrides, get_recipe

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # bitwise comparisons need deterministic kernels where torch has them (index_add, scatter);
    # warn_only: a kernel without one (or a Triton expert kernel) shows up as run-to-run noise
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = apply_overrides(get_recipe(recipe), [*overrides, "parallel.min_workers=1",
                                               "parallel.max_workers=1", f"train.steps={k + 10}"])
    ckpt_dir = tempfile.mkdtemp(prefix="gpu_service_b_")
    init_group(backend)
    # two fault-free runs: how far apart runs are anyway (non-deterministic kernels)
    refs = []
    for _ in range(2):
        trainer = build_trainer(cfg, device, ckpt_dir)
        losses = run_steps(trainer, k + 2)
        refs.append((losses, weights(trainer)))
        del trainer
    noise_loss = max(abs(a - b) for a, b in zip(refs[0][0], refs[1][0], strict=True))
    noise_w = max_diff(refs[0][1], refs[1][1])
    # the run that loses its group after K steps and rebuilds it in place
    trainer = build_trainer(cfg, device, ckpt_dir)
    before = run_losses = run_steps(trainer, k)
    step_before = trainer.step
    shards = trainer.export(0, trainer.step)
    del trainer
    aborted: dict[str, Any] = {}

    def abort() -> None:  # from another thread, as the worker's control thread does it
        try:
            from elastic_moe.parallel.comm import abort_communicators

            aborted["count"] = abort_communicators()
        except Exception as exc:  # recorded: the rebuild below still has to work
            aborted["error"] = repr(exc)

    thread = threading.Thread(target=abort, name="abort-communicators")
    thread.start()
    thread.join(timeout=60)
    aborted["hung"] = thread.is_alive()
    try:
        dist.destroy_process_group()
    except Exception as exc:
        aborted["destroy_error"] = repr(exc)
    init_group(backend)
    trainer = build_trainer(cfg, device, ckpt_dir)
    trainer.restore_from_shards([shards])
    step_after = trainer.step
    after = run_steps(trainer, 2)
    final = weights(trainer)
    dist.destroy_process_group()
    ref_losses = refs[0][0]
    loss_diff = max(abs(a - b) for a, b in zip(before + after, ref_losses, strict=True))
    w_diff = max_diff(final, refs[0][1])
    checks = {"step after rebuild == step before": step_after == step_before == k,
              "abort returned": not aborted["hung"] and "error" not in aborted,
              "losses equal fault-free (within run-to-run noise)": loss_diff <= noise_loss,
              "weights equal fault-free (within run-to-run noise)": w_diff <= noise_w}
    ok = all(checks.values())
    summary = (f"{backend}: step {step_before} -> rebuilt at {step_after}; aborted "
               f"{aborted.get('count', aborted.get('error'))} group(s); losses K+1..K+2 max abs diff "
               f"{loss_diff:.3g} (noise {noise_loss:.3g}), weights max abs diff {w_diff:.3g} "
               f"(noise {noise_w:.3g})" + ("; bitwise equal" if loss_diff == w_diff == 0 else ""))
    del run_losses
    return {"status": "PASS" if ok else "FAIL", "summary": summary, "backend": backend, "k": k,
            "reference_losses": ref_losses, "rebuilt_losses": before + after,
            "loss_max_abs_diff": loss_diff, "weights_max_abs_diff": w_diff,
            "noise_loss": noise_loss, "noise_weights": noise_w, "abort": aborted,
            "checks": checks}


def phase_rebuild_subprocess(recipe: str, overrides: list[str], work: str, backend: str,
                             budget: Budget) -> dict[str, Any]:
    """Phase b in its own process: a hung abort or NCCL error cannot take the script with it."""
    log = os.path.join(work, "b_rebuild.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--out", work, "--pg-backend", backend,
           "--phase-b-child", recipe, json.dumps(overrides)]
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    code = run_logged(cmd, log, budget.left())
    with open(log) as f:
        found = [line for line in f if line.startswith("PHASE_B_RESULT ")]
    if code != 0 or not found:
        return {"status": "FAIL", "summary": f"phase b process exited {code}", "log_tail": tail(log)}
    return {**json.loads(found[-1].removeprefix("PHASE_B_RESULT ")), "log": log}


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_service.md/.json and logs")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU + gloo with the debug recipe: checks the script in seconds")
    parser.add_argument("--time-limit-s", type=float, default=540.0,
                        help="bound on the whole script; phases that no longer fit are skipped")
    parser.add_argument("--steps", type=int, default=None, help="steps of phase a (default 8/6)")
    parser.add_argument("--resume-steps", type=int, default=None,
                        help="steps of phase c (default 10/8)")
    parser.add_argument("--phases", default="abc", help="which phases to run, e.g. 'b' or 'ac'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every phase (e.g. model.expert_backend=torch)")
    parser.add_argument("--phase-b-child", nargs=2, metavar=("RECIPE", "OVERRIDES_JSON"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--pg-backend", default=None,
                        help="process-group backend of phase b (default: what actors/train_worker.py "
                             "uses: nccl on CUDA, gloo on CPU; e.g. 'cpu:gloo,cuda:nccl')")
    parser.add_argument("--ray-stop", choices=("auto", "yes", "no"), default="auto",
                        help="`ray stop --force` after the kill in phase c (auto: only on CUDA; "
                             "it stops every Ray on the machine)")
    args = parser.parse_args()
    if args.phase_b_child:
        result = phase_rebuild(args.phase_b_child[0], json.loads(args.phase_b_child[1]), k=3,
                               backend=args.pg_backend)
        print("PHASE_B_RESULT " + json.dumps(result, default=str))
        return
    for module in ("ray", "mlflow"):
        require(module)
    if args.dry_run:  # the CPU path even on a GPU box, for this process and every child
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_service.py: no CUDA device; use --dry-run for the CPU check")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    recipe = "small" if cuda else "debug"
    overrides = (GPU_CUT if cuda else DRY_CUT) + list(args.set)
    steps = args.steps or (8 if cuda else 6)
    resume_steps = args.resume_steps or (10 if cuda else 8)
    work = os.path.abspath(os.path.join(args.out, "work"))
    os.makedirs(work, exist_ok=True)
    # CPU has no peak to measure MFU against: a nominal 1 TFLOP/s checks that it is logged
    svc = Service(recipe, overrides + ([] if cuda else ["tracking.peak_tflops=1"]), work,
                  tracking_uri(work))
    budget = Budget(args.time_limit_s)
    from elastic_moe.parallel.comm import process_group_backend

    pg_backend = args.pg_backend or process_group_backend(torch.device("cuda" if cuda else "cpu"))
    report = Report(args.out, device, {
        "recipe": recipe, "overrides": svc.overrides, "steps_a": steps, "steps_c": resume_steps,
        "tracking_uri": svc.uri, "pg_backend_b": pg_backend, "torch": torch.__version__,
        "time_limit_s": args.time_limit_s})
    # rough minimum seconds each phase needs (Ray start + data + steps) before it is tried
    phases = [("a. train + MLflow", 40.0, lambda: phase_train(svc, steps, budget)),
              ("b. abort + rebuild in place", 15.0,
               lambda: phase_rebuild_subprocess(recipe, overrides, work, pg_backend, budget)),
              ("c. kill -9 + resume", 60.0,
               lambda: phase_kill_resume(svc, resume_steps, budget,
                                         args.ray_stop == "yes" or (args.ray_stop == "auto"
                                                                    and cuda)))]
    for letter, (name, need, fn) in zip("abc", phases, strict=True):
        if letter not in args.phases:
            continue
        if budget.left() < need:
            report.add({"phase": name, "status": "SKIPPED", "seconds": 0.0,
                        "summary": f"{budget.left():.0f} s left of --time-limit-s, needs ~{need:.0f}"})
            continue
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:
            result = {"status": "FAIL", "summary": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
        report.add({"phase": name, "seconds": time.monotonic() - start, **result})
    print(report.table())
    failed = [p["phase"] for p in report.phases if p["status"] != "PASS"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
