"""Tuning: MetaSchedule over the kernels of the whole training step, and applying its databases.

    pockengine tune train.py --target host --trials 2000 -o tuning_logs/host/mobilenetv2
    pockengine build train.py --target host      # applies every database under tuning_logs/host/

A tuning log is a MetaSchedule JSON database directory (database_workload.json and
database_tuning_record.json, one JSON document per line). Kernels are matched structurally, so a
log tuned for one job serves any job with an identical kernel (same shapes, same fusion). Kernels
with no record keep the default schedule (passes/schedule_cpu.py) — a missing or stale log never
fails a build; a corrupt one is an error naming the file.

Tuning runs on the kernels the build produces: the training step after the sparse passes,
legalized and fused exactly as `build.lowering_passes` does before applying the log. Kernels too
small to matter (under MIN_FLOP_SHARE of the step's estimated FLOPs) are not tuned.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time

from .errors import InputError, PockEngineError

WORKLOAD_FILE, RECORD_FILE = "database_workload.json", "database_tuning_record.json"
# Kernels below this share of the step's estimated FLOPs keep the default schedule: a training step
# has dozens of transposes, casts and scalar reductions that would each cost a round of trials.
MIN_FLOP_SHARE = 0.005
TRIALS_PER_ROUND = 16


class TuningLogError(PockEngineError, ValueError):
    """A tuning log (MetaSchedule database) is unreadable."""


# ---------------------------------------------------------------------- the kernels worth tuning


@dataclasses.dataclass
class Kernel:
    name: str
    mod: object  # IRModule {"main": PrimFunc}, as MetaSchedule tunes and looks it up
    calls: int
    flop: float

    @property
    def weighted_flop(self) -> float:
        return self.flop * self.calls


def kernels(fused_mod, target) -> list[Kernel]:
    """The distinct kernels of a fused module (structurally equal ones merged, as MetaSchedule's
    task extraction does), with call counts and estimated FLOPs, costliest first."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    found = []
    for task in ms.relax_integration.extract_tasks(fused_mod, target):
        try:
            flop = float(estimate_tir_flops(task.dispatched[0]))
        except Exception:  # noqa: BLE001 - an unanalysable kernel is still a kernel; count it as cheap
            flop = 0.0
        found.append(Kernel(task.task_name, task.dispatched[0], int(task.weight), flop))
    return sorted(found, key=lambda k: -k.weighted_flop)


def worth_tuning(all_kernels: list[Kernel], min_flop_share: float = MIN_FLOP_SHARE) -> list[Kernel]:
    total = sum(k.weighted_flop for k in all_kernels) or 1.0
    return [k for k in all_kernels if k.weighted_flop / total >= min_flop_share]


# ---------------------------------------------------------------------- databases


def log_directories(path: str) -> list[str]:
    """A database directory, or a directory of them (tuning_logs/<target>/<workload>/) -> database dirs."""
    if os.path.isfile(os.path.join(path, WORKLOAD_FILE)):
        return [path]
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", WORKLOAD_FILE)))


def _check_json_lines(path: str, what: str) -> None:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TuningLogError(f"{path} is not a text file (byte {e.start} is not UTF-8): not a MetaSchedule "
                             "database, or a corrupt one; delete it or re-run `pockengine tune`") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise TuningLogError(f"{path}: line {number} is not JSON ({e.msg}); the file is corrupt — delete it "
                                 "or re-run `pockengine tune`") from None
        if not isinstance(entry, list) or len(entry) != 2:  # [hash, IR] or [workload index, record]
            raise TuningLogError(f"{path}: line {number} is not a MetaSchedule {what} entry; the file is corrupt")


def check_log(directory: str, create: bool = False) -> None:
    """Raise TuningLogError naming the file and line when `directory` is not a readable tuning log
    (a line check, in a fraction of the time MetaSchedule takes to read the database)."""
    workload, record = os.path.join(directory, WORKLOAD_FILE), os.path.join(directory, RECORD_FILE)
    if not create and not os.path.isfile(workload):
        raise TuningLogError(f"{directory} is not a tuning log: it has no {WORKLOAD_FILE}")
    for path, what in ((workload, "workload"), (record, "tuning record")):
        if os.path.isfile(path):
            _check_json_lines(path, what)


def open_log(directory: str, create: bool = False):
    """A MetaSchedule JSONDatabase for `directory`, validated line by line first so a damaged file is
    named instead of surfacing as a C++ parse error."""
    from tvm.s_tir import meta_schedule as ms

    check_log(directory, create)
    workload, record = os.path.join(directory, WORKLOAD_FILE), os.path.join(directory, RECORD_FILE)
    try:
        return ms.database.JSONDatabase(path_workload=workload, path_tuning_record=record, allow_missing=create)
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types for malformed entries
        raise TuningLogError(f"{directory}: MetaSchedule cannot read this database "
                             f"({str(e).strip().splitlines()[-1][:300]}); delete it or re-run `pockengine tune`") from None


@dataclasses.dataclass
class TuningReport:
    """What a build took from tuning logs: which kernels run tuned schedules and which fell back."""

    logs: list[str]
    tuned: list[str]
    fallback: list[str]  # kernels worth tuning that have no record in the logs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TuningReport":
        return cls(**data)

    def summary(self) -> str:
        if not self.logs:
            return "tuning: no log; every kernel uses the default schedule"
        text = (f"tuning: {len(self.tuned)} kernels tuned, {len(self.fallback)} on the default schedule "
                f"(logs: {', '.join(self.logs)})")
        if self.fallback:
            shown = ", ".join(self.fallback[:8]) + (" ..." if len(self.fallback) > 8 else "")
            text += f"\n  no record for: {shown}"
        return text


def open_logs(directories: list[str]):
    """One database over several tuning logs (None for none). Reading a database is TVM's slowest
    step of a build that has logs (4 s for the two shipped ones) and a build may need it three
    times (backend measurement, and the switched and the all-TVM lowering), so what was read stays
    in this process until its files change."""
    from tvm.s_tir import meta_schedule as ms

    key = tuple((d, _file_stamp(os.path.join(d, WORKLOAD_FILE)), _file_stamp(os.path.join(d, RECORD_FILE)))
                for d in directories)
    if key not in _OPENED:
        databases = [open_log(d) for d in directories]
        if len(_OPENED) >= 4:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = (databases[0] if len(databases) == 1 else ms.database.UnionDatabase(*databases)
                        if databases else None)
    return _OPENED[key]


_OPENED: dict = {}  # open_logs' databases by (directory, file stamps)


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return st.st_mtime_ns, st.st_size


def apply_database(fused_mod, target, database):
    """`fused_mod` with the kernels `database` has records for replaced by their best schedule
    (marked `tirx.is_scheduled`)."""
    from tvm import relax

    if database is None:
        return fused_mod
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused_mod)


def apply_logs(fused_mod, target, directories: list[str]):
    """(module with tuned kernels marked `tirx.is_scheduled`, TuningReport)."""
    import tvm

    from .ir import is_scheduled

    if not directories:
        return fused_mod, TuningReport([], [], [])
    tuned_mod = apply_database(fused_mod, target, open_logs(directories))
    # Kernels are compared by structure: FuseTIR gives identical kernels different names.
    candidates = {_structure(k.mod["main"]) for k in worth_tuning(kernels(fused_mod, target))}
    tuned, fallback = [], []
    for gv, func in tuned_mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if is_scheduled(func):
            tuned.append(gv.name_hint)
        elif _structure(func) in candidates:
            fallback.append(gv.name_hint)
    return tuned_mod, TuningReport(list(directories), sorted(tuned), sorted(fallback))


def _structure(func) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(func.with_attr("global_symbol", "main"))


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


def build_kernel(mod, target, _params):
    """MetaSchedule's builder function without its default's `import tvm.s_tir.tensor_intrin`,
    which takes longer than the builder's timeout in every fresh worker process; with fast_math,
    as the build applies it to tuned kernels, and like the step's kernels without argument checks."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .ir import without_kernel_argument_checks
    from .passes.fast_math import fast_math

    mod = fast_math()(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod))
    with without_kernel_argument_checks():
        return tvm_build(mod, target=target)


@dataclasses.dataclass
class RPCTracker:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> "RPCTracker":
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
        print(f"[{self.done:>5}/{max(self.total, self.done)} trials {mins:>3}:{secs:02d}] task {task + 1}/{len(self.names)} "
              f"{self.names[task][:48]:<48} best {best}", file=self.stream, flush=True)

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
    return _tune(job, target, trials, output, time_budget_s, rpc, stream, seed, min_flop_share)


def _tune(job, target, trials: int, output: str, time_budget_s, rpc, stream, seed: int, min_flop_share: float) -> dict:
    from tvm.s_tir import meta_schedule as ms

    from . import build, targets
    from .targets.device_runner import configure_thread_pool

    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    started = time.perf_counter()  # the budget counts the step's compile and the kernels' extraction too
    preset = targets.resolve(target)
    tvm_target = preset.target()
    selected = worth_tuning(kernels(build.fused_step(job, preset), tvm_target), min_flop_share)
    if not selected:
        raise InputError(f"job {job.name!r} has no kernel worth tuning")
    os.makedirs(output, exist_ok=True)
    database = open_log(output, create=True)
    already = 0
    for k in selected:
        if database.has_workload(k.mod):
            already += len(database.get_top_k(database.commit_workload(k.mod), 10**6))
    remaining = trials - already
    print(f"tuning {len(selected)} kernels of {job.name!r} for {preset.name} "
          f"({sum(k.weighted_flop for k in selected) / 1e9:.3f} GFLOP per step); "
          f"{already} trials already in {output}, {max(remaining, 0)} to run"
          + (f", budget {time_budget_s:.0f} s" if time_budget_s else ""), file=stream, flush=True)
    if remaining <= 0:
        return {"tasks": [k.name for k in selected], "trials_run": 0, "already": already}

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    _import_cpu_tensor_intrinsics(tvm_target)
    with tempfile.TemporaryDirectory(prefix="pockengine-tune-") as work_dir:  # MetaSchedule's per-task logs
        contexts = [ms.TuneContext(mod=k.mod, target=tvm_target, space_generator="post-order-apply",
                                   search_strategy="evolutionary", task_name=k.name, num_threads=preset.cores,
                                   logger=None, rand_state=seed + i)
                    for i, k in enumerate(selected)]
        progress = Progress(remaining, [k.name for k in selected], stream, time_budget_s, start=started)
        builder = _budgeted(ms.builder.LocalBuilder(f_build=build_kernel, max_workers=preset.cores, timeout_sec=120),
                            progress)
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
        if rpc is None:
            # Measured with the cores the step will use, its pool configured in the worker (the
            # thread that measures), as the runtime configures the step's
            runner = ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator,
                                           initializer=functools.partial(configure_thread_pool, preset.cores))
        else:
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                               session_priority=1, session_timeout_sec=120),
                evaluator_config=evaluator, max_workers=1)
        # MetaSchedule's first search round cannot be stopped once begun: a budget already used up by
        # the step's compile and the kernels' extraction starts none.
        progress.stopped = progress.out_of_time()
        if not progress.stopped:
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=[float(k.calls) for k in selected], work_dir=work_dir,
                    max_trials_global=remaining, num_trials_per_iter=TRIALS_PER_ROUND, builder=builder,
                    runner=runner, database=database, cost_model="xgb",
                    measure_callbacks=[_measure_callback(progress)]
                    + ms.measure_callback.MeasureCallback.create("default"))
            except Exception:
                if not progress.stopped:
                    raise
        if progress.stopped:
            print(f"time budget of {time_budget_s:.0f} s used up; every measured round is in the database",
                  file=stream, flush=True)
    print(progress.table(), file=stream, flush=True)
    return {"tasks": [k.name for k in selected], "trials_run": progress.done, "already": already,
            "best_ms": {n: b * 1e3 for n, b in zip(progress.names, progress.best) if b < float("inf")}}

