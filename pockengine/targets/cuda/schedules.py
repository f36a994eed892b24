"""Default GPU schedules: each kernel without a tuning record gets the first of TVM's dlight rules
that applies to it, one kernel at a time."""

from __future__ import annotations

import dataclasses

from .kernel_check import unbound_compute


def _dlight_rules():
    """TVM's default GPU schedules, most specific first (the order of TVM's own CUDA pipeline):
    Fallback binds any kernel's loops to blocks and threads, so it comes last."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]



@dataclasses.dataclass
class ScheduleReport:
    """Which schedule each kernel got: "tuned" (a tuning record), "legalization" (already bound to GPU
    threads by its legalization), a dlight rule's name, or None (none applied)."""

    schedules: dict  # kernel -> "tuned" | "legalization" | rule name | None
    rule_errors: dict  # kernel -> ["Rule: message", ...] for rules that raised on it
    tuning: object = None  # tuning.TuningReport

    def counts(self) -> dict:
        out: dict = {}
        for how in self.schedules.values():
            out[how or "unscheduled"] = out.get(how or "unscheduled", 0) + 1
        return out


def default_schedules(mod, target, rules=None):
    """(module, ScheduleReport): every kernel without a schedule (no tuning record) gets the first
    dlight rule that applies. Rules are tried one kernel at a time and a rule that raises counts as
    not applying: dlight.ApplyDefaultSchedule aborts the whole module on the first exception, and
    on a training step some do raise (gpu.Matmul on a MobileNetV2 weight-gradient kernel: "There are
    some consumers of the cache-write stage that are not properly inlined")."""
    from ...ir import is_scheduled, map_kernels

    rules = _dlight_rules() if rules is None else rules
    schedules, errors = {}, {}

    def schedule(name, func):
        """`func` with the first dlight rule that applies; None when tuned, legalized for the GPU
        already, or no rule applies (each case is reported)."""
        if is_scheduled(func):
            schedules[name] = "tuned"
            return None
        found, tags = unbound_compute(func)
        if tags and not found:
            # TOPI legalized it for the GPU already (scatter, sort, ...: kernels with their own launches).
            schedules[name] = "legalization"
            return None
        schedules[name] = None
        for rule in rules:
            try:
                space = rule.apply(func, target, False)
            except Exception as e:  # noqa: BLE001 - next rule; all messages kept for the report
                errors.setdefault(name, []).append(f"{type(rule).__name__}: {_one_line(e)}")
                continue
            if space is not None:
                schedules[name] = type(rule).__name__
                sch = space[0] if isinstance(space, list) else space
                return sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return None

    # include_scheduled: tuned kernels are reported too, and GPUs give threads to the kernels CPUs
    # run as written (ir.AS_WRITTEN_ON_CPUS).
    with target:
        mod = map_kernels(mod, schedule, include_scheduled=True, named=True)
    return mod, ScheduleReport(schedules, errors)


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__


REPORT = "schedules"  # where the pass leaves its ScheduleReport in the pipeline's notes


def default_schedules_pass(target, notes: dict, rules=None):
    """default_schedules as a module pass (the CUDA family's schedule phase); its ScheduleReport
    goes to notes[REPORT]."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="DlightDefaultSchedules")
    def apply(mod, _ctx):
        mod, notes[REPORT] = default_schedules(mod, target, rules)
        return mod

    return apply
