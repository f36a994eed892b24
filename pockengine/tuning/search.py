"""Tuning: MetaSchedule over the kernels of the whole training step (the database side, reading and
applying logs, is database.py).

    pockengine tune train.py --target host --trials 2000 -o tuning_logs/host/mobilenetv2
    pockengine build train.py --target host      # applies every database under tuning_logs/host/

Tuning runs on the kernels the build produces: the training step after the sparse passes, fused
exactly as pipeline.py fuses it before applying the log. Kernels too small to matter (under
MIN_FLOP_SHARE of the step's estimated FLOPs) are not tuned.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import sys
import tempfile
import time

from .. import pipeline
from ..errors import InputError
from ..ir import without_kernel_argument_checks
from ..targets import resolve
from ..targets.device_runner import configure_thread_pool
from ..targets.families import family
from .database import MIN_FLOP_SHARE, kernels, open_log, worth_tuning

TRIALS_PER_ROUND = 16

# ---------------------------------------------------------------------- tuning


def _import_cpu_tensor_intrinsics(target) -> None:
    """TuneContext imports `tvm.s_tir.tensor_intrin`, whose __init__ registers the intrinsics of every
    target: 37 s here, 24 of them CUDA's. A CPU target needs only its own ISA's, so the package is
    registered without running its __init__ and just that submodule is loaded."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or target.kind.name != "llvm":
        return
    spec = importlib.util.find_spec(name)
    sys.modules[name] = importlib.util.module_from_spec(spec)
    triple = str(target.attrs.get("mtriple", "") or "")
    isa = "arm_cpu" if triple.startswith(("aarch64", "arm")) else "x86"
    importlib.import_module(f"{name}.{isa}")


def build_kernel(family_name: str, mod, target, _params):
    """MetaSchedule's builder function (with the family's name bound) without its default's
    `import tvm.s_tir.tensor_intrin`, which takes longer than the builder's timeout in every fresh
    worker process; with the passes the build gives every scheduled kernel of the family
    (pipeline.Lowering.finish_kernels: fast_math on CPUs), and like the step's kernels without
    argument checks."""
    import tvm
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    mod = tvm.transform.Sequential(family(family_name).lowering.finish_kernels())(mod)
    with without_kernel_argument_checks():
        return tvm_build(mod, target=target)


@dataclasses.dataclass
class RPCTracker:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> RPCTracker:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--rpc-tracker must be HOST:PORT, got {address!r}")
        if not key:
            raise InputError("--rpc-tracker needs --rpc-key (the key the device's rpc server registered with)")
        return cls(host, int(port), key)


class Progress:
    """One line per measured round: trials so far, the task, its best time; a table at the end."""

    def __init__(self, total_trials: int, names: list[str], stream=sys.stderr, budget_s: float | None = None,
                 start: float | None = None):
        self.total, self.names, self.stream, self.budget = total_trials, names, stream, budget_s
        self.done = 0
        self.stopped = False
        self.best = [float("inf")] * len(names)
        self.trials = [0] * len(names)
        self.errors = [0] * len(names)
        self.start = time.perf_counter() if start is None else start  # a perf_counter() value

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget

    def record(self, task: int, seconds: list[float | None]) -> None:
        self.done += len(seconds)
        self.trials[task] += len(seconds)
        good = [s for s in seconds if s is not None]
        self.errors[task] += len(seconds) - len(good)
        if good:
            self.best[task] = min(self.best[task], min(good))
        best = f"{self.best[task] * 1e3:.3f} ms" if self.best[task] < float("inf") else "no valid schedule yet"
        mins, secs = divmod(int(self.elapsed()), 60)
        print(f"[{self.done:>5}/{max(self.total, self.done)} trials {mins:>3}:{secs:02d}] "
              f"task {task + 1}/{len(self.names)} {self.names[task][:48]:<48} best {best}",
              file=self.stream, flush=True)

    def table(self) -> str:
        lines = [f"{'task':<52}{'trials':>8}{'errors':>8}{'best ms':>10}"]
        for name, n, e, b in zip(self.names, self.trials, self.errors, self.best):
            lines.append(f"{name[:50]:<52}{n:>8}{e:>8}{(f'{b * 1e3:.3f}' if b < float('inf') else '-'):>10}")
        return "\n".join(lines)


def _measure_callback(progress: Progress):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ReportAndStop(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, _candidates, builder_results, runner_results):
            if any(b.error_msg == BUDGET_USED_UP for b in builder_results):
                # A round the budgeted builder skipped: stop here, before MetaSchedule's own callbacks
                # (this one runs first) record it as failed trials. Raising is the only clean exit:
                # terminating tasks from a callback trips the scheduler's checks.
                progress.stopped = True
                raise TimeBudgetExhausted()
            seconds = []
            for built, ran in zip(builder_results, runner_results):
                ok = built.error_msg is None and ran.error_msg is None and ran.run_secs
                seconds.append(sum(float(s) for s in ran.run_secs) / len(ran.run_secs) if ok else None)
            progress.record(task_id, seconds)

    return ReportAndStop()


class TimeBudgetExhausted(Exception):
    pass


BUDGET_USED_UP = "not built: the time budget is used up"


def _budgeted(builder, progress: Progress):
    """`builder` that stops building once the time budget is used up. MetaSchedule submits a round
    of every task before it measures the first (a CNN's step has dozens of tasks: many minutes), so
    the measure callback alone would notice the budget far too late; unbuilt candidates cost nothing
    to "run" and the next callback ends the tuning."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class BudgetedBuilder(PyBuilder):
        def build(self, build_inputs):
            if progress.out_of_time():
                return [BuilderResult(None, BUDGET_USED_UP) for _ in build_inputs]
            return builder.build(build_inputs)

    return BudgetedBuilder()


def tune(job, target, trials: int, output: str, time_budget_s: float | None = None,
         rpc: RPCTracker | None = None, stream=sys.stderr, seed: int = 0,
         min_flop_share: float = MIN_FLOP_SHARE) -> dict:
    """Tune the kernels of `job`'s training step for `target` into the database at `output`: those
    with at least `min_flop_share` of the step's estimated FLOPs, costliest first.

    Resumable: trials already in `output` for these kernels count toward `trials`, and the search
    starts from their best schedules. Returns a summary dict (tasks, trials run, per-task best).
    The local runner's worker process measures on the target's cores: it configures its TVM thread
    pool when it starts (device_runner.configure_thread_pool); no environment variable is set."""
    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    if time_budget_s is not None and not time_budget_s > 0:  # also refuses NaN
        raise InputError(f"--time-budget must be a positive number of seconds, got {time_budget_s}")
    started = time.perf_counter()  # the budget counts the step's compile and the kernels' extraction too
    preset = resolve(target)
    lowering = family(preset).lowering
    tvm_target = lowering.tvm_target(preset)
    selected = worth_tuning(kernels(pipeline.fused_step(job, preset, lowering), tvm_target), min_flop_share)
    if not selected:
        raise InputError(f"job {job.name!r} has no kernel worth tuning")
    os.makedirs(output, exist_ok=True)
    database = open_log(output, create=True)
    already = _trials_in(database, selected)
    remaining = trials - already
    print(f"tuning {len(selected)} kernels of {job.name!r} for {preset.name} "
          f"({sum(k.weighted_flop for k in selected) / 1e9:.3f} GFLOP per step); "
          f"{already} trials already in {output}, {max(remaining, 0)} to run"
          + (f", budget {time_budget_s:g} s" if time_budget_s else ""), file=stream, flush=True)
    if remaining <= 0:
        return {"tasks": [k.name for k in selected], "trials_run": 0, "already": already}
    progress = Progress(remaining, [k.name for k in selected], stream, time_budget_s, start=started)
    _search(selected, preset, tvm_target, database, progress, rpc, seed)
    if progress.stopped:
        print(f"time budget of {time_budget_s:g} s used up; every measured round is in the database",
              file=stream, flush=True)
    print(progress.table(), file=stream, flush=True)
    return {"tasks": [k.name for k in selected], "trials_run": progress.done, "already": already,
            "best_ms": {n: b * 1e3 for n, b in zip(progress.names, progress.best) if b < float("inf")}}


def _trials_in(database, selected: list) -> int:
    """The trials `database` holds for the selected kernels (they count toward the requested ones)."""
    already = 0
    for k in selected:
        if database.has_workload(k.mod):
            already += len(database.get_top_k(database.commit_workload(k.mod), 10**6))
    return already


def _search(selected: list, preset, tvm_target, database, progress: Progress, rpc, seed: int) -> None:
    """MetaSchedule's evolutionary search over the selected kernels, weighted by their calls per
    step, until `progress.total` trials are measured or its time budget is used up."""
    from tvm.s_tir import meta_schedule as ms

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    _import_cpu_tensor_intrinsics(tvm_target)
    # MetaSchedule's first search round cannot be stopped once begun: a budget already used up by
    # the step's compile and the kernels' extraction starts none.
    progress.stopped = progress.out_of_time()
    if progress.stopped:
        return
    with tempfile.TemporaryDirectory(prefix="pockengine-tune-") as work_dir:  # MetaSchedule's per-task logs
        contexts = [ms.TuneContext(mod=k.mod, target=tvm_target, space_generator="post-order-apply",
                                   search_strategy="evolutionary", task_name=k.name, num_threads=preset.cores,
                                   logger=None, rand_state=seed + i)
                    for i, k in enumerate(selected)]
        builder = _budgeted(ms.builder.LocalBuilder(f_build=functools.partial(build_kernel, preset.family),
                                                    max_workers=preset.cores, timeout_sec=120), progress)
        try:
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=[float(k.calls) for k in selected], work_dir=work_dir,
                max_trials_global=progress.total, num_trials_per_iter=TRIALS_PER_ROUND, builder=builder,
                runner=_runner(preset, rpc), database=database, cost_model="xgb",
                measure_callbacks=[_measure_callback(progress)] + ms.measure_callback.MeasureCallback.create("default"))
        except Exception:
            if not progress.stopped:
                raise


def _runner(preset, rpc):
    """Where candidates are measured: here (the worker's thread pool configured with the cores the
    step will use, as the runtime configures the step's) or on devices behind an RPC tracker."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator,
                                     initializer=functools.partial(configure_thread_pool, preset.cores))
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                       session_priority=1, session_timeout_sec=120),
        evaluator_config=evaluator, max_workers=1)
