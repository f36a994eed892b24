"""The sparse-update search (MCUNetV3, PockEngine): which biases and which weights, at which channel
ratios, a model trains under a memory budget, chosen from what each measurably buys on the task.

    result = pe.search_sparse_update(job, budget="256KB", data=train_batches, eval_data=held_out,
                                     target="cortex-m7")
    job.sparse_update = result.scheme           # an ordinary SparseUpdate (SparseUpdate.mcunetv3(...))
    print(result.report()); result.plot("search.png")
    result.save("search.json")                  # pe.SparseUpdate.load("search.json") reads the scheme

    analysis = pe.analyze_sparse_update(job, data=train_batches, eval_data=held_out, target="cortex-m7")
    small, large = analysis.choose("128KB"), analysis.choose("256KB")   # one analysis, several budgets

Units are MCUNetV3's: the convs are the conv, depthwise and linear weights in model order, the last
one the classifier, which always trains (a new task's head). A scheme is `mcunetv3(k, weights,
ratios)`: the biases of the last k convs and each chosen conv's weight at a channel ratio.

1. Contribution analysis. One build on this machine trains every parameter; a candidate's short fine-tuning
   run is that step with what the candidate does not train put back after every step (the channels
   past a ratio too), which is the trajectory of the candidate's own sparse build (tested against
   one). Contribution = the metric (held-out top-1 accuracy) after the run minus the baseline's (the
   classifier alone): of the biases of the last k convs, k on a grid, and of each of the last
   `weight_layers` convs' weights at each ratio of RATIOS.
2. Memory: each candidate's training memory from the memory planner for the target (build.memory_plan:
   the plan `compile` makes), counting what the step writes or allocates: everything but the frozen
   weights, which stay read-only (Flash on a microcontroller).
3. Search: the contributions add up (MCUNetV3's assumption) and so, estimated, do the memories over
   the baseline's; the Pareto front of (estimated memory, summed contribution) over every choice
   of bias depth and per-layer ratio is exact (dynamic programming over the layers). Its best
   points under the budget are then planned for real, best first, and the first whose plan fits is
   the result (after VERIFIED_CANDIDATES refusals: the best measured single unit that fits); it is
   trained once more to measure what it reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import time

import numpy as np

from .errors import InputError, JobError
from .sparse import FROZEN, FULL, SparseUpdate, ratio_channels

RATIOS = (0.125, 0.25, 0.5, 1.0)
UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}  # KB, MB, GB read as KiB, MiB, GiB
VERIFIED_CANDIDATES = 8  # real plans tried, best first, before settling for less


def parse_budget(budget) -> int:
    """Bytes from an int or a string such as "256KB", "256 KiB", "1.5MB" (KB = KiB, as device
    datasheets mean it)."""
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?[iI]?[bB]?)\s*", str(budget))
    if not match or isinstance(budget, bool):
        raise InputError(f"budget {budget!r}: give bytes (an int) or a size such as '256KB' or '1.5MiB'")
    unit = match.group(2).lower() or "b"
    unit = {"k": "kib", "m": "mib", "g": "gib", "kb": "kib", "mb": "mib", "gb": "gib"}.get(unit, unit)
    if unit not in UNITS:
        raise InputError(f"budget {budget!r}: unknown unit {match.group(2)!r}; use B, KB/KiB, MB/MiB or GB/GiB")
    value = float(match.group(1)) * UNITS[unit]
    if value < 1:
        raise InputError(f"budget {budget!r} is not positive")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A scheme in MCUNetV3's terms: biases of the last `bias_depth` convs, and {conv index: ratio}."""
    bias_depth: int
    weights: tuple = ()  # ((conv index, ratio), ...), ascending index, the classifier's included

    def scheme(self) -> SparseUpdate:
        idx = [i for i, _ in self.weights]
        return SparseUpdate.mcunetv3(self.bias_depth, idx, [r for _, r in self.weights])

    def describe(self, convs: list) -> str:
        weights = ", ".join(f"{convs[i]} x{_ratio(r)}" for i, r in self.weights)
        return f"biases of the last {self.bias_depth} convs; weights {weights}"


@dataclasses.dataclass
class Point:
    """A scheme the search measured or planned: its metric (None: not trained), training memory
    (None: not planned), the estimate the search ranked it by."""
    label: str
    choice: Choice | None
    metric: float | None = None
    memory: int | None = None
    estimated_metric: float | None = None
    estimated_memory: int | None = None


@dataclasses.dataclass
class SearchResult:
    scheme: SparseUpdate
    choice: Choice
    budget: int
    target: str
    convs: list  # the conv weights' names, in model order
    baseline: Point  # the classifier alone
    bias_points: list  # [Point] of the bias depths
    weight_points: dict  # {conv index: {ratio: Point}}
    front: list  # [Point]: the estimated Pareto front
    verified: list  # [Point]: front points planned for real, the chosen one among them
    chosen: Point
    presets: list  # [Point]: hand-written schemes, trained and planned beside
    seconds: float

    def report(self) -> str:
        mib = 1024
        lines = [f"sparse-update search for {self.target}, budget {self.budget / mib:.1f} KiB "
                 f"({self.seconds:.0f} s): {self.chosen.label}",
                 f"  chosen: {self.choice.describe(self.convs)}",
                 f"  measured metric {self.chosen.metric:.4f} (estimated {self.chosen.estimated_metric:.4f}), "
                 f"training memory {self.chosen.memory / mib:.1f} KiB (estimated "
                 f"{self.chosen.estimated_memory / mib:.1f})", "",
                 f"{'scheme':<44}{'metric':>8}{'KiB':>10}"]
        for p in [self.baseline] + self.presets + [self.chosen]:
            lines.append(f"{p.label[:43]:<44}{_num(p.metric):>8}{_kib(p.memory):>10}")
        ratios = sorted({r for by_ratio in self.weight_points.values() for r in by_ratio})
        lines += ["", "contributions (metric over the classifier alone's; training memory KiB):",
                  f"{'unit':<44}" + "".join(f"{'x' + _ratio(r):>16}" for r in ratios)]
        for index, by_ratio in self.weight_points.items():
            cells = "".join(f"{_gain(by_ratio[r], self.baseline) if r in by_ratio else '-':>16}" for r in ratios)
            lines.append(f"{'weight ' + self.convs[index]:<44.43}{cells}")
        for p in self.bias_points:
            lines.append(f"{p.label[:43]:<44}{_gain(p, self.baseline):>16}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Metric against training memory (PNG): the estimated front, the points planned for real,
        the chosen one, the hand-written schemes and the budget."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        front = sorted(self.front, key=lambda p: p.estimated_memory)
        ax.plot([p.estimated_memory / 1024 for p in front], [p.estimated_metric for p in front], "-", color="0.7",
                label="estimated front (contributions added)")
        real = [p for p in self.verified if p.memory is not None]
        ax.scatter([p.memory / 1024 for p in real], [p.estimated_metric for p in real], marker="x", color="tab:blue",
                   label="front points planned for real")
        for p in self.presets + [self.baseline]:
            ax.scatter([p.memory / 1024], [p.metric], marker="s", color="tab:gray")
            ax.annotate(p.label, (p.memory / 1024, p.metric), fontsize=7, xytext=(4, -8), textcoords="offset points")
        ax.scatter([self.chosen.memory / 1024], [self.chosen.metric], marker="*", s=160, color="tab:red",
                   label="chosen (measured)", zorder=3)
        ax.axvline(self.budget / 1024, color="tab:red", linestyle=":", label="budget")
        ax.set_xlabel(f"training memory on {self.target}, KiB (planned)")
        ax.set_ylabel("held-out metric")
        ax.set_title("sparse-update search")
        ax.legend(fontsize=7, loc="lower right")
        from .artifact_files import write_figure

        return write_figure(fig, path)

    def to_json(self) -> dict:
        return {"scheme": self.scheme.to_json(), "budget": self.budget, "target": self.target,
                "convs": self.convs, "chosen": _point_json(self.chosen), "baseline": _point_json(self.baseline),
                "bias": [_point_json(p) for p in self.bias_points],
                "weights": {self.convs[i]: {str(r): _point_json(p) for r, p in by.items()}
                            for i, by in self.weight_points.items()},
                "front": [_point_json(p) for p in self.front], "verified": [_point_json(p) for p in self.verified],
                "presets": [_point_json(p) for p in self.presets], "seconds": self.seconds}

    def save(self, path: str) -> str:
        """The result as JSON, written atomically; SparseUpdate.load(path) reads its scheme."""
        from .artifact_files import write_file_atomically

        return write_file_atomically(path, json.dumps(self.to_json(), indent=1).encode())


# ------------------------------------------------------------------ the search


def search(job, budget=None, *, data, eval_data, target="host", progress=True, **options) -> SearchResult:
    """Search the sparse-update scheme of `job`'s model that scores best on `eval_data` after
    training on `data` under `budget` bytes of training memory on `target` (see the module's text):
    `analyze(job, ...).choose(budget)`, the budget checked before the analysis starts.

    budget: bytes or a size ("256KB"); default the target's SRAM (microcontrollers) less the stack the
    runtime reserves and the input batch. The other options are analyze's.
    """
    from . import targets

    _budget(budget, targets.resolve(target), job)  # a bad budget fails before minutes of analysis
    analysis = analyze(job, data=data, eval_data=eval_data, target=target, progress=progress, **options)
    return analysis.choose(budget)


def analyze(job, *, data, eval_data, target="host", steps=None, weight_layers=6, bias_depths=None, ratios=RATIOS,
            metric=None, presets=None, run_target=None, progress=True) -> Analysis:
    """The contribution analysis of `job`'s model for `target` (steps 1 and 2 of the module's text),
    from which `.choose(budget)` searches a scheme at any number of budgets without training again.

    data, eval_data: lists of batches `(inputs..., target)` shaped as the job's example batch.
    steps: training steps of each run (default: one pass over `data`).
    weight_layers: how many convs before the classifier are weight candidates.
    bias_depths: the bias depths tried (default 5 points from the classifier alone to every conv).
    metric: `metric(model, eval_data) -> float`, higher is better (default: top-1 accuracy).
    presets: {label: SparseUpdate} trained and planned beside for the report (default: bias-only,
    last-k at two depths and full fine-tuning).
    run_target: what the contribution runs are built for: a target this machine runs (default:
    `target` when it runs here, else "host").
    """
    from . import targets
    from .build import compile as compile_job
    from .build import memory_plan
    from .frontend.parameter_use import parameter_ops
    from .pipeline import import_model
    from .targets.families import family as family_of

    started = time.perf_counter()
    preset = targets.resolve(target)
    data, eval_data = _batches(data, job, "data"), _batches(eval_data, job, "eval_data")
    steps = len(data) if steps is None else _positive_int(steps, "steps")
    ratios = _ratios(ratios)
    metric = metric or top1_accuracy
    if job.is_onnx or job.sparse_update is not None and (job.sparse_update.lora_spec or
                                                         job.sparse_update.lite_residual_spec):
        raise JobError("search_sparse_update searches a PyTorch model's own parameters: give a job without "
                       "LoRA or lite residual branches (the search replaces the job's sparse_update)")

    imported = import_model(job)
    kinds = parameter_ops(imported.func, imported.param_vars)
    names = [s.name for s in imported.params]
    convs = [n for n in names if kinds.get(n) in ("conv", "depthwise", "linear") and n.endswith("weight")]
    if len(convs) < 2:
        raise JobError(f"search_sparse_update needs a model with a classifier and at least one conv or linear "
                       f"layer before it; this one has {len(convs)} ({', '.join(convs) or 'none'})")
    head = len(convs) - 1
    depths = _depths(bias_depths, len(convs))
    candidates = list(range(max(0, head - _positive_int(weight_layers, "weight_layers")), head))
    presets = _default_presets(len(convs)) if presets is None else dict(presets)
    say = _Progress(progress, 2 + len(depths) + len(candidates) * len(ratios) + len(presets))  # at most

    def planned(scheme) -> int:
        return training_memory(memory_plan(_with_scheme(job, scheme), preset, imported=imported))

    if run_target is None:
        family = family_of(preset)
        run_target = preset if family.runs_here({"family": family.name}) else "host"
    say("compiling the full update for the contribution runs")
    runner = _Runner(compile_job(_with_scheme(job, SparseUpdate.full()), run_target), job.model, data, eval_data, steps,
                     metric)

    def trained(scheme) -> float:
        return runner.run(_with_scheme(job, scheme).plan(imported))

    def measured(label, choice) -> Point:
        say(f"{label}: training {steps} steps, planning for {preset.name}")
        return Point(label, choice, trained(choice.scheme()), planned(choice.scheme()))

    classifier = ((head, 1.0),)
    baseline = measured("classifier only", Choice(1, classifier))
    bias_points = [measured(f"biases of the last {k} convs", Choice(k, classifier)) for k in depths]
    shapes = {p.name: tuple(p.shape) for p in imported.params}
    weight_points = {i: {r: measured(f"weight {convs[i]} x{_ratio(r)}", Choice(1, ((i, r),) + classifier))
                         for r in _distinct_ratios(ratios, shapes[convs[i]], kinds[convs[i]])} for i in candidates}
    preset_points = []
    for label, scheme in presets.items():
        say(f"preset {label}")
        preset_points.append(Point(label, None, trained(scheme), planned(scheme)))
    say.done()
    return Analysis(job, preset, convs, head, baseline, bias_points, weight_points, preset_points, trained, planned,
                    progress, time.perf_counter() - started)


@dataclasses.dataclass
class Analysis:
    """What each unit buys on the task and what it costs on the target; choose(budget) searches it."""
    job: object
    preset: object  # the target
    convs: list
    head: int
    baseline: Point
    bias_points: list
    weight_points: dict
    presets: list
    trained: object  # scheme -> metric after the short run (the analysis's build)
    planned: object  # scheme -> training memory on the target (memory planner)
    progress: bool
    seconds: float

    @property
    def front(self) -> list:
        return _pareto_front(self.baseline, self.bias_points, self.weight_points, self.head)

    def choose(self, budget=None) -> SearchResult:
        """The best scheme under `budget` (bytes or a size; default the target's SRAM less the stack
        the runtime reserves and the input batch): the front's best estimates planned for real until
        one fits, then trained once to measure it (step 3 of the module's text)."""
        started = time.perf_counter()
        preset, baseline = self.preset, self.baseline
        budget = _budget(budget, preset, self.job)
        if baseline.memory > budget:  # the least this search trains: nothing else can fit
            raise JobError(f"search_sparse_update: no scheme fits {budget / 1024:.1f} KiB on {preset.name}: the "
                           f"classifier alone plans {baseline.memory / 1024:.1f} KiB of training memory "
                           "(activations and the trained part); give a larger budget, a smaller batch or resolution")
        say = _Progress(self.progress, 1)
        front = self.front
        admissible = sorted((p for p in front if p.estimated_memory <= budget), key=lambda p: -p.estimated_metric)
        verified, chosen = [], None
        for point in admissible[:VERIFIED_CANDIDATES]:
            say.note(f"planning the front point {point.label} for real")
            point.memory = self.planned(point.choice.scheme())
            verified.append(point)
            if point.memory <= budget:
                chosen = point
                break
        measured_points = [baseline, *self.bias_points, *(p for by in self.weight_points.values() for p in by.values())]
        if chosen is None:  # the front's best estimates all planned over: the best measured unit that fits
            fitting = [p for p in measured_points if p.memory <= budget]
            chosen = max(fitting, key=lambda p: p.metric, default=None)
            if chosen is not None:
                chosen = dataclasses.replace(chosen, estimated_metric=chosen.metric, estimated_memory=chosen.memory)
        if chosen is None:
            cheapest = min(measured_points, key=lambda p: p.memory)
            raise JobError(f"search_sparse_update: no scheme fits {budget / 1024:.1f} KiB on {preset.name}: the "
                           f"smallest, {cheapest.label}, plans {cheapest.memory / 1024:.1f} KiB of training memory "
                           "(activations and the trained part); give a larger budget, a smaller batch or resolution")
        say(f"training the chosen scheme ({chosen.label})")
        chosen.metric = self.trained(chosen.choice.scheme())
        return SearchResult(chosen.choice.scheme(), chosen.choice, budget, preset.name, self.convs, baseline,
                            self.bias_points, self.weight_points, front, verified, chosen, self.presets,
                            self.seconds + time.perf_counter() - started)


def top1_accuracy(model, eval_data) -> float:
    """The share of `eval_data`'s targets the model's largest output names (eval mode)."""
    import torch

    from .frontend.torch import eval_mode

    right = total = 0
    with eval_mode(model), torch.no_grad():
        for *inputs, target in eval_data:
            out = model(*inputs)
            out = getattr(out, "logits", out)
            right += int((out.argmax(-1) == target).sum())
            total += int(target.numel())
    return right / total


class _Runner:
    """Short fine-tuning runs of any scheme on one build that trains every parameter: after each
    step, what the scheme does not train is put back (its channels past a ratio too)."""

    def __init__(self, program, model, data, eval_data, steps, metric):
        self.program, self.data, self.eval_data, self.steps, self.metric = program, data, eval_data, steps, metric
        self.model = copy.deepcopy(model)
        self.initial = program.state_arrays()
        self.initial_model = program.state_dict()

    def run(self, plan: dict) -> float:
        """The metric after `steps` steps that train what `plan` trains."""
        program = self.program
        program.load_state_dict(self.initial)
        frozen = {n: self.initial_model[n] for n, rule in plan.items() if rule == FROZEN}
        partial = {n: rule for n, rule in plan.items() if rule not in (FULL, FROZEN)}
        for step in range(self.steps):
            program.step(*self.data[step % len(self.data)])
            restored = dict(frozen)
            if partial:
                state = program.state_dict()
                for name, part in partial.items():
                    value = state[name].copy()
                    index = [slice(None)] * value.ndim
                    index[part.axis] = slice(part.channels, None)
                    value[tuple(index)] = self.initial_model[name][tuple(index)]
                    restored[name] = value
            program.load_state_dict(restored, strict=False)
        self.model.load_state_dict(program.state_dict(as_torch=True))
        return float(self.metric(self.model, self.eval_data))


def _pareto_front(baseline: Point, bias_points: list, weight_points: dict, head: int) -> list:
    """[Point] of the choices no other beats in both estimated memory and summed contribution."""
    base_metric, base_memory = baseline.metric, baseline.memory
    front = [(p.memory - base_memory, p.metric - base_metric, p.choice.bias_depth, ()) for p in bias_points]
    front = _prune(front + [(0, 0.0, 1, ())])
    for index, by_ratio in weight_points.items():
        options = [(0, 0.0, None)] + [(p.memory - base_memory, p.metric - base_metric, r) for r, p in by_ratio.items()]
        front = _prune([(m + om, g + og, depth, weights + (((index, r),) if r is not None else ()))
                        for m, g, depth, weights in front for om, og, r in options])
    points = []
    for memory, gain, depth, weights in front:
        choice = Choice(depth, tuple(sorted(weights)) + ((head, 1.0),))
        points.append(Point(f"searched: {_short(choice)}", choice, estimated_metric=base_metric + gain,
                            estimated_memory=base_memory + memory))
    return points


def _distinct_ratios(ratios: list, shape: tuple, kind: str) -> list:
    """The ratios that train different numbers of a weight's channels, at least one: a 3-channel
    input conv has 1/4 (1 channel), 1/2 (2) and 1 (all), not 1/8 (none)."""
    kept = {}
    for r in ratios:
        channels = ratio_channels(r, shape, kind)[0]
        if channels >= 1:
            kept.setdefault(channels, r)
    return sorted(kept.values())


def _prune(entries: list) -> list:
    """The entries (memory, gain, ...) not dominated: by memory ascending, each with more gain than
    every cheaper one (ties: the first)."""
    kept, best = [], -math.inf
    for entry in sorted(entries, key=lambda e: (e[0], -e[1])):
        if entry[1] > best:
            kept.append(entry)
            best = entry[1]
    return kept


def _short(choice: Choice) -> str:
    weights = "-".join(str(i) for i, _ in choice.weights)
    ratios = "-".join(_ratio(r) for _, r in choice.weights)
    return f"mcunetv3({choice.bias_depth}, {weights!r}, {ratios!r})"


def _default_presets(n_convs: int) -> dict:
    return {"every bias + classifier": SparseUpdate.mcunetv3(n_convs, [n_convs - 1], [1]),
            "last 2 layers": SparseUpdate.last_k(2), "last 4 layers": SparseUpdate.last_k(4),
            "full": SparseUpdate.full()}


def training_memory(report) -> int:
    """What a step's plan writes or allocates: its peak less the frozen weights (parameters without
    a gradient: read-only, in Flash on a microcontroller)."""
    return report.peak_bytes - (report.by_category["parameters"] - report.gradient_bytes)


def _budget(budget, preset, job) -> int:
    """The budget given, or the target's SRAM less what the step's plan does not hold: the stack the
    runtime reserves and the input batch."""
    if budget is not None:
        return parse_budget(budget)
    if not preset.sram_bytes:
        raise InputError(f"search_sparse_update: {preset.name} has no SRAM size to default the budget to; give "
                         "budget= (bytes or a size such as '256KB')")
    from .frontend import to_numpy
    from .targets.cortex_m.project import STACK_BYTES

    batch = sum(to_numpy(x).nbytes for x in tuple(job.example_inputs) + (job.example_targets,))
    return int(preset.sram_bytes) - STACK_BYTES - batch


def _batches(batches, job, what: str) -> list:
    batches = list(batches)
    if not batches:
        raise InputError(f"search_sparse_update: {what} has no batch")
    example = tuple(job.example_inputs) + (job.example_targets,)
    for i, batch in enumerate(batches):
        batch = tuple(batch)
        if what == "data" and (len(batch) != len(example) or any(
                tuple(b.shape) != tuple(e.shape) for b, e in zip(batch, example))):
            raise InputError(f"search_sparse_update: {what}[{i}] has shapes {[tuple(b.shape) for b in batch]}; the "
                             f"job's step takes {[tuple(e.shape) for e in example]} (inputs..., target)")
        batches[i] = batch
    return batches


def _depths(depths, n_convs: int) -> list:
    if depths is None:
        return sorted({max(1, round(n_convs * f)) for f in (0.25, 0.5, 0.75, 1.0)} - {1})
    depths = sorted({_positive_int(d, "bias_depths") for d in depths})
    if depths[-1] > n_convs:
        raise InputError(f"search_sparse_update: bias depth {depths[-1]} exceeds the model's {n_convs} convs")
    return depths


def _ratios(ratios) -> list:
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise InputError(f"search_sparse_update: ratios must be in (0, 1], got {r!r}")
        out.append(float(r))
    return sorted(set(out))


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"search_sparse_update: {what} must be an integer >= 1, got {value!r}")
    return int(value)


def _with_scheme(job, scheme):
    job = copy.copy(job)
    job.sparse_update = scheme
    return job


def _ratio(r: float) -> str:
    return "1" if r == 1 else f"1/{round(1 / r)}" if abs(1 / r - round(1 / r)) < 1e-9 else f"{r:g}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _kib(v) -> str:
    return "-" if v is None else f"{v / 1024:.1f}"


def _gain(point: Point, baseline: Point) -> str:
    return f"{point.metric - baseline.metric:+.3f} / {point.memory / 1024:.0f}"


def _point_json(p: Point) -> dict:
    return {"label": p.label, "metric": p.metric, "memory": p.memory, "estimated_metric": p.estimated_metric,
            "estimated_memory": p.estimated_memory,
            "choice": None if p.choice is None else {"bias_depth": p.choice.bias_depth,
                                                     "weights": [list(w) for w in p.choice.weights]}}


class _Progress:
    """One line per stage on stderr: its number, what it does, the seconds so far."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.count, self.start = enabled, total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.count += 1
        if self.enabled:
            print(f"[search {self.count}/{self.total}, {time.perf_counter() - self.start:.0f} s] {what}",
                  file=sys.stderr, flush=True)

    def note(self, what: str) -> None:
        if self.enabled:
            print(f"[search, {time.perf_counter() - self.start:.0f} s]   {what}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(f"[search] done in {time.perf_counter() - self.start:.0f} s", file=sys.stderr, flush=True)
