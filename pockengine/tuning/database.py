"""Tuning logs: MetaSchedule databases, which kernels of a step are worth tuning, and applying the
records a build finds in them (the search that writes them is search.py).

A tuning log is a MetaSchedule JSON database directory (database_workload.json and
database_tuning_record.json, one JSON document per line). Kernels are matched structurally, so a
log tuned for one job serves any job with an identical kernel (same shapes, same fusion). Kernels
with no record keep the default schedule of their target family — a missing or stale log never
fails a build; a corrupt one is an error naming the file.

Records are applied to the fused step (pipeline.py, after the `fuse` phase), before the family's
default schedules: exactly the module `pockengine tune` extracts its kernels from.
"""


from __future__ import annotations

import dataclasses
import glob
import json
import os

from ..errors import PockEngineError

WORKLOAD_FILE, RECORD_FILE = "database_workload.json", "database_tuning_record.json"
# Kernels below this share of the step's estimated FLOPs keep the default schedule: a training step
# has dozens of transposes, casts and scalar reductions that would each cost a round of trials.
MIN_FLOP_SHARE = 0.005


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
                             f"({str(e).strip().splitlines()[-1][:300]}); "
                             "delete it or re-run `pockengine tune`") from None


@dataclasses.dataclass
class TuningReport:
    """What a build took from tuning logs: which kernels run tuned schedules and which fell back."""

    logs: list[str]
    tuned: list[str]
    fallback: list[str]  # kernels worth tuning that have no record in the logs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TuningReport:
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

    from ..ir import is_scheduled

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


