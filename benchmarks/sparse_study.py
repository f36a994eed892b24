"""What each sparse-update scheme's fine-tuning reaches, and what it costs (MCUNetV3, TinyTL, the search).

    python benchmarks/sparse_study.py                    # both tasks, 3 seeds (about 20 minutes on 2 cores)
    python benchmarks/sparse_study.py --task shapes --plot build/sparse_study.png --json build/study.json
    python benchmarks/sparse_study.py --small            # what CI runs: the digits task, tiny, one seed
    python benchmarks/sparse_study.py --task shapes --analysis-passes 3   # longer contribution runs

A network is pretrained (plain PyTorch, the "cloud" part), gets a new classifier, and is fine-tuned
on a new task through PockEngine under each scheme; test accuracy is the mean ± sd over seeds (the
data order of fine-tuning), memory is the training memory the memory planner gives for the task's
target (the planned peak less the frozen weights, which stay read-only: Flash on a microcontroller;
the search's own measure).

Tasks:
- digits: examples/transfer_digits. Its SmallCNN pretrained on digits 0-4, fine-tuned on 5-9 (16x16,
  batch 32, BatchNorm training); memory planned for the host.
- shapes, harder: MobileNetV2-0.35 (examples/mobilenetv2; MCUNet's mbv2-w0.35) pretrained on ten
  generated shapes in flat colours, fine-tuned on ten other shapes in another domain (striped fills,
  backgrounds crossed by random lines, more noise) from 100 images a class; 32x32, batch 1 with
  BatchNorm frozen, as MCUNetV3 trains on a microcontroller; memory planned for a Cortex-M7 (an
  STM32F746 is the Tiny Training Engine's board).

Schemes: full; last-k; every bias and the classifier (TinyTL's bias-only); TinyTL's lite residual
branches with every bias and the classifier; a hand-written MCUNetV3 scheme; and the searched scheme
(pe.analyze_sparse_update on a validation split of the training data, one analysis, then
.choose(budget)) at three budgets: the hand-written scheme's memory, half of last-k's and bias-only's
(a budget below what the classifier alone needs is skipped). Every scheme of a task trains for the
same epochs with the task's optimizer (digits: SGD with momentum 0.9, as the example; shapes: Adam,
with which full fine-tuning of the frozen-BatchNorm network trained at all where SGD's steps
collapsed it) at its learning rate, fixed below: digits the example's, shapes the better of two on
the validation split (one seed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples", "mobilenetv2")]

from quantized_quality import example  # noqa: E402
from sparse_memory import freeze_batchnorm  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench  # noqa: E402
from pockengine.build import memory_plan  # noqa: E402
from pockengine.sparse_search import top1_accuracy, training_memory  # noqa: E402

KiB = 1024
FULL, LAST_K, BIAS_ONLY = "full", "last-k (last block + head)", "bias-only + classifier"
LITE, HANDWRITTEN = "lite residual + biases + classifier", "MCUNetV3 hand-written"
SCHEMES = (FULL, LAST_K, BIAS_ONLY, LITE, HANDWRITTEN)  # each task's hand-written schemes, by label


# ------------------------------------------------------------------ the generated shapes task


def _shape_classes():
    """{name: inside(u, v)} of the pretraining shapes and of the new task's, in a unit frame."""
    def r(u, v):
        return np.hypot(u, v)

    def box(u, v):
        return np.maximum(abs(u), abs(v))

    source = {
        "circle": lambda u, v: r(u, v) < 0.85,
        "square": lambda u, v: box(u, v) < 0.7,
        "diamond": lambda u, v: abs(u) + abs(v) < 0.9,
        "triangle": lambda u, v: (v < 0.6) & (v > 1.6 * abs(u) - 0.9),
        "ring": lambda u, v: (r(u, v) < 0.85) & (r(u, v) > 0.5),
        "cross": lambda u, v: ((abs(u) < 0.25) | (abs(v) < 0.25)) & (box(u, v) < 0.85),
        "ellipse": lambda u, v: u ** 2 + (v / 0.45) ** 2 < 0.8,
        "semicircle": lambda u, v: (r(u, v) < 0.85) & (v > -0.1),
        "star": lambda u, v: r(u, v) < 0.45 + 0.4 * np.cos(5 * np.arctan2(v, u)),
        "bar": lambda u, v: (abs(u) < 0.85) & (abs(v) < 0.22),
    }
    target = {
        "hexagon": lambda u, v: np.maximum(abs(u) * 0.866 + abs(v) * 0.5, abs(v)) < 0.75,
        "L": lambda u, v: ((u > -0.8) & (u < -0.3) & (abs(v) < 0.8)) | ((abs(u) < 0.8) & (v > 0.3) & (v < 0.8)),
        "T": lambda u, v: ((abs(u) < 0.8) & (v > -0.8) & (v < -0.35)) | ((abs(u) < 0.22) & (abs(v) < 0.8)),
        "crescent": lambda u, v: (r(u, v) < 0.85) & ((u - 0.4) ** 2 + v ** 2 > 0.5),
        "bowtie": lambda u, v: (abs(v) >= abs(u)) & (abs(v) < 0.85),
        "x": lambda u, v: ((abs(u - v) < 0.32) | (abs(u + v) < 0.32)) & (box(u, v) < 0.8),
        "frame": lambda u, v: (box(u, v) < 0.85) & (box(u, v) > 0.5),
        "arrow": lambda u, v: ((abs(v) < 0.18) & (u > -0.85) & (u < 0.2)) | ((u >= 0.1) & (abs(v) < 0.85 - u)),
        "two dots": lambda u, v: ((u + 0.45) ** 2 + v ** 2 < 0.12) | ((u - 0.45) ** 2 + v ** 2 < 0.12),
        "arc": lambda u, v: (r(u, v) < 0.85) & (r(u, v) > 0.5) & (v < 0.1),
    }
    return source, target


SOURCE_SHAPES, TARGET_SHAPES = _shape_classes()


def render_shapes(classes: dict, n: int, size: int, rng, new_domain: bool):
    """n images (n, 3, size, size) float32 in [0, 1] and their labels: each class's shape at a random
    place, scale, rotation (within 30 degrees) and colour on a contrasting background; `new_domain`:
    striped fills, backgrounds crossed by three random lines, more noise."""
    labels = rng.integers(0, len(classes), n)
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    scale = rng.uniform(0.45, 0.85, n)[:, None, None]
    cx, cy = (rng.uniform(-1, 1, (2, n)) * (1 - scale[:, 0, 0]))[:, :, None, None]
    theta = rng.uniform(-0.5, 0.5, n)[:, None, None]
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    inside = np.zeros((n, size, size), bool)
    for k, shape in enumerate(classes.values()):
        pick = labels == k
        inside[pick] = shape(u[pick], v[pick])
    fg = rng.uniform(0, 1, (n, 3, 1, 1))
    bg = np.clip(1 - fg + rng.normal(0, 0.15, (n, 3, 1, 1)), 0, 1)
    if new_domain:
        angle, freq = rng.uniform(0, np.pi, n)[:, None, None], rng.uniform(4, 8, n)[:, None, None]
        fill = fg * (0.4 + 0.6 * (0.5 + 0.5 * np.sin(freq * np.pi * (x * np.cos(angle) + y * np.sin(angle))))[:, None])
        lines = np.zeros((n, size, size))
        for _ in range(3):
            a, offset = rng.uniform(0, np.pi, n)[:, None, None], rng.uniform(-1, 1, n)[:, None, None]
            lines = np.maximum(lines, abs(x * np.cos(a) + y * np.sin(a) - offset) < 0.04)
        lines = 0.6 * lines[:, None]
        bg = bg * (1 - lines) + lines * rng.uniform(0, 1, (n, 3, 1, 1))
        noise = 0.12
    else:
        fill, noise = fg, 0.05
    images = np.where(inside[:, None], fill, bg) + rng.normal(0, noise, (n, 3, size, size))
    return np.clip(images, 0, 1).astype("float32"), labels.astype("int64")


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass
class Task:
    name: str
    model: nn.Module  # pretrained, with the new task's classifier
    train: tuple  # (x, y) numpy: fine-tuning
    val: tuple  # the search's and the learning rates' held-out split
    test: tuple
    batch: int
    epochs: int
    target: str  # memory planned for
    schemes: dict  # {label: (SparseUpdate, learning rate)}, labels SCHEMES
    search_lr: float  # the searched schemes' learning rate
    search_options: dict
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    pretrain_seconds: float = 0.0
    build_target: object = "host"  # what the fine-tuning runs are compiled for (this machine)

    def __post_init__(self):
        assert tuple(self.schemes) == SCHEMES, "every task has the study's schemes, in its order"

    def job(self, scheme, lr):
        x, y = self.train
        optimizer = pe.optim.Adam(lr=lr) if self.optimizer == "adam" else pe.optim.SGD(lr=lr, momentum=0.9)
        return pe.TrainingJob(copy.deepcopy(self.model), (torch.from_numpy(x[:self.batch]),),
                              torch.from_numpy(y[:self.batch]), "cross_entropy", optimizer,
                              sparse_update=scheme, name=f"{self.name}_study")

    def batches(self, split):
        x, y = split
        return [(torch.from_numpy(x[i:i + self.batch]), torch.from_numpy(y[i:i + self.batch]))
                for i in range(0, len(x) - self.batch + 1, self.batch)]


def digits_task(small: bool) -> Task:
    digits = example("transfer_digits")  # by path, as `transfer_digits_train`: the tests load a `transfer_digits`
    started = time.perf_counter()
    torch.manual_seed(0)
    model = digits.SmallCNN()
    digits.pretrain(model, epochs=2 if small else 15)
    model.classifier = nn.Linear(model.classifier.in_features, 5)
    x = digits.images(digits.x_new_train).numpy()
    y = digits.y_new_train.astype("int64")
    held = len(x) // 5
    test = (digits.images(digits.x_new_test).numpy(), digits.y_new_test.astype("int64"))
    schemes = {FULL: (pe.SparseUpdate.full(), 0.05), LAST_K: (pe.SparseUpdate.last_k(3), 0.05),
               BIAS_ONLY: (pe.SparseUpdate.bias_only() | {"classifier": "full"}, 0.1),
               LITE: (pe.SparseUpdate.lite_residual() | {"classifier": "full"}, 0.1),
               # the example's channel-ratio scheme in MCUNetV3's terms (5 convs, the classifier last)
               HANDWRITTEN: (pe.SparseUpdate.mcunetv3(5, [2, 3, 4], [0.25, 0.5, 1]), 0.05)}
    options = dict(weight_layers=1, ratios=(0.5,), bias_depths=[3]) if small else {}
    return Task("digits", model, (x[held:], y[held:]), (x[:held], y[:held]), test, digits.BATCH, 2 if small else 20,
                "host", schemes, search_lr=0.05, search_options=options,
                pretrain_seconds=time.perf_counter() - started)


def shapes_task(small: bool) -> Task:
    from mobilenetv2 import MobileNetV2

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    size, per_class = 32, (2 if small else 100)
    source = render_shapes(SOURCE_SHAPES, 200 if small else 6000, size, rng, new_domain=False)
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=len(SOURCE_SHAPES), width_mult=0.35)
    pretrain_shapes(model, source, epochs=1 if small else 20)
    model.classifier[1] = nn.Linear(model.last_channel, len(TARGET_SHAPES))
    freeze_batchnorm(model)
    train = render_shapes(TARGET_SHAPES, per_class * len(TARGET_SHAPES), size, rng, new_domain=True)
    val = render_shapes(TARGET_SHAPES, 20 if small else 300, size, rng, new_domain=True)
    test = render_shapes(TARGET_SHAPES, 20 if small else 2000, size, rng, new_domain=True)
    schemes = {FULL: (pe.SparseUpdate.full(), 3e-4), LAST_K: (pe.SparseUpdate.last_k(9), 1e-3),
               BIAS_ONLY: (pe.SparseUpdate.bias_only() | {"classifier.*": "full"}, 3e-3),
               LITE: (pe.SparseUpdate.lite_residual() | {"classifier.*": "full"}, 3e-3),
               # benchmarks/mcu_memory.py's: biases of the last 12 convs, 1/8 of two late 1x1 convs' input
               # channels, the classifier
               HANDWRITTEN: (pe.SparseUpdate.mcunetv3(12, "47-50-52", "0.125-0.125-1"), 3e-3)}
    return Task("shapes", model, train, val, test, 8, 1 if small else 10, "cortex-m7", schemes, search_lr=3e-3,
                search_options={}, optimizer="adam", pretrain_seconds=time.perf_counter() - started)


def pretrain_shapes(model, data, epochs: int, batch: int = 64):
    x, y = map(torch.from_numpy, data)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=epochs * (len(x) // batch))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            if len(idx) == batch:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                schedule.step()


# ------------------------------------------------------------------ fine-tuning


@dataclasses.dataclass
class Row:
    label: str
    lr: float
    accuracies: list
    trained: int  # trained parameters (elements)
    memory: int  # training memory on the task's target, bytes
    seconds: float

    @property
    def mean(self):
        return float(np.mean(self.accuracies))

    @property
    def sd(self):
        return float(np.std(self.accuracies))


def fine_tune(task: Task, label: str, scheme, lr: float, seeds, log) -> Row:
    """The scheme compiled once; per seed: the pretrained state, `epochs` passes in that seed's order,
    test accuracy of the result."""
    started = time.perf_counter()
    job = task.job(scheme, lr)
    program = pe.compile(job, task.build_target)
    initial = program.state_arrays()
    x, y = task.train
    accuracies = []
    for seed in seeds:
        program.load_state_dict(initial)
        rng = np.random.default_rng(seed)
        for _ in range(task.epochs):
            order = rng.permutation(len(x))
            for i in range(0, len(order) - task.batch + 1, task.batch):
                program.step(x[order[i:i + task.batch]], y[order[i:i + task.batch]])
        job.model.load_state_dict(program.state_dict(as_torch=True))
        accuracies.append(top1_accuracy(job.model, task.batches(task.test) if task.batch > 1 else
                                        [tuple(map(torch.from_numpy, task.test))]))
    memory = training_memory(memory_plan(job, task.target))
    row = Row(label, lr, accuracies, program.signature.trained_elements, memory, time.perf_counter() - started)
    log(f"  {label}: {100 * row.mean:.1f}% ± {100 * row.sd:.1f}, {memory / KiB:.1f} KiB ({row.seconds:.0f} s)")
    return row


def study(task: Task, seeds, log, only=None) -> dict:
    """Every scheme of the task (or those labelled in `only`) fine-tuned with each seed, then the
    search at the budgets those schemes give."""
    log(f"{task.name}: pretrained in {task.pretrain_seconds:.0f} s; fine-tuning {len(task.train[0])} images, "
        f"{task.epochs} epochs, batch {task.batch}, {len(seeds)} seeds; memory planned for {task.target}")
    rows = {label: fine_tune(task, label, scheme, lr, seeds, log) for label, (scheme, lr) in task.schemes.items()
            if only is None or label in only}
    started = time.perf_counter()
    analysis = pe.analyze_sparse_update(task.job(None, task.search_lr), data=task.batches(task.train),
                                        eval_data=task.batches(task.val), target=task.target, presets={},
                                        run_target=task.build_target, **task.search_options)
    log(f"  contribution analysis: {analysis.seconds:.0f} s")
    budgets = {}
    if HANDWRITTEN in rows:
        budgets["hand-written's memory"] = rows[HANDWRITTEN].memory
    if LAST_K in rows:
        budgets["1/2 of last-k's"] = rows[LAST_K].memory // 2
    if BIAS_ONLY in rows:
        budgets["bias-only's memory"] = rows[BIAS_ONLY].memory
    searches = {}
    for what, budget in budgets.items():
        if budget < analysis.baseline.memory:
            log(f"  search at {what} ({budget / KiB:.1f} KiB): below the classifier alone's "
                f"{analysis.baseline.memory / KiB:.1f} KiB, skipped")
            continue
        result = analysis.choose(budget)
        label = f"searched at {what}"
        searches[label] = {"budget": budget, "scheme": result.choice.describe(result.convs),
                           "search_seconds": result.seconds, "chosen": result.chosen.label}
        rows[label] = fine_tune(task, label, result.scheme, task.search_lr, seeds, log)
    return {"rows": rows, "searches": searches, "analysis_seconds": analysis.seconds,
            "search_seconds": time.perf_counter() - started - sum(rows[k].seconds for k in searches)}


# ------------------------------------------------------------------ report


def table(task: Task, outcome: dict) -> str:
    rows = outcome["rows"]
    full = rows.get(FULL)
    lines = [f"{task.name}: test accuracy after {task.epochs} epochs (mean ± sd over seeds); training memory "
             f"planned for {task.target}",
             f"{'scheme':<40}{'lr':>7}{'test accuracy':>16}{'vs full':>9}{'trained params':>16}{'memory KiB':>12}"
             f"{'x full':>8}"]
    for row in rows.values():
        versus = f"{100 * (row.mean - full.mean):+.1f}" if full else "-"
        share = f"{row.memory / full.memory:.3f}" if full else "-"
        lines.append(f"{row.label:<40}{row.lr:>7g}{100 * row.mean:>10.1f} ± {100 * row.sd:<3.1f}{versus:>9}"
                     f"{row.trained:>16,}{row.memory / KiB:>12.1f}{share:>8}")
    for label, search in outcome["searches"].items():
        lines.append(f"  {label} ({search['budget'] / KiB:.1f} KiB): {search['scheme']}")
    lines.append(f"  search: contribution analysis {outcome['analysis_seconds']:.0f} s, with the choices at every "
                 f"budget {outcome['search_seconds']:.0f} s")
    return "\n".join(lines)


def goals(task: Task, outcome: dict) -> str:
    """The issue's goals, measured: each compares two schemes the study ran (skipped otherwise)."""
    rows = outcome["rows"]
    pairs = [("searched at hand-written's memory", HANDWRITTEN, "searched at the hand-written scheme's memory vs it"),
             ("searched at 1/2 of last-k's", LAST_K, "searched at 1/2 of last-k's memory vs last-k"),
             ("searched at bias-only's memory", BIAS_ONLY, "searched at bias-only's memory vs bias-only"),
             (LITE, FULL, "lite residual + biases vs full fine-tuning")]
    out = [f"{task.name} goals:"]
    for mine, theirs, what in pairs:
        if mine in rows and theirs in rows:
            a, b = rows[mine], rows[theirs]
            out.append(f"  {what}: {100 * (a.mean - b.mean):+.1f} points at {a.memory / b.memory:.2f} of its memory "
                       f"({a.memory / KiB:.1f} vs {b.memory / KiB:.1f} KiB)")
    return "\n".join(out)


def plot(tasks: list, outcomes: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task, outcome in zip(axes[0], tasks, outcomes):
        for row in outcome["rows"].values():
            searched = row.label.startswith("searched")
            ax.errorbar([row.memory / KiB], [100 * row.mean], yerr=[100 * row.sd], fmt="*" if searched else "o",
                        markersize=11 if searched else 6, color="tab:red" if searched else "tab:blue", capsize=3)
            ax.annotate(row.label, (row.memory / KiB, 100 * row.mean), fontsize=7, xytext=(5, -3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"training memory planned for {task.target}, KiB (log)")
        ax.set_ylabel("test accuracy, % (mean ± sd over seeds)")
        ax.set_title(f"{task.name}: fine-tuning {task.epochs} epochs, batch {task.batch}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return bench.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["digits", "shapes", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="the digits task, tiny, one seed (CI)")
    parser.add_argument("--scheme", action="append", choices=SCHEMES, help="only this hand-written scheme (repeat; "
                        "default all); the searches run at the budgets the chosen ones give")
    parser.add_argument("--analysis-passes", type=int, default=1, help="passes over the training data of each "
                        "contribution run of the search (default 1: the search's own default)")
    parser.add_argument("--build-target", default="host", help="what the runs compile for (a target of this machine)")
    parser.add_argument("--plot", help="write accuracy against memory as a PNG here")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.analysis_passes < 1:
        parser.error("--seeds and --analysis-passes must be at least 1")
    names = ["digits"] if args.small else ["digits", "shapes"] if args.task == "both" else [args.task]
    seeds = range(1 if args.small else args.seeds)
    build_target = json.loads(args.build_target) if args.build_target.lstrip().startswith("{") else args.build_target

    def log(line):
        print(line, file=sys.stderr, flush=True)

    tasks, outcomes = [], []
    for name in names:
        task = (digits_task if name == "digits" else shapes_task)(args.small)
        task.build_target = build_target
        if args.analysis_passes > 1:
            task.search_options["steps"] = args.analysis_passes * (len(task.train[0]) // task.batch)
        tasks.append(task)
        outcomes.append(study(task, seeds, log, args.scheme))
        print(table(task, outcomes[-1]) + "\n" + goals(task, outcomes[-1]) + "\n", flush=True)
    if args.plot:
        print(f"plot: {plot(tasks, outcomes, args.plot)}")
    if args.json:
        from pockengine.artifact_files import write_file_atomically

        data = {task.name: {"rows": [dataclasses.asdict(r) for r in o["rows"].values()], "searches": o["searches"],
                            "analysis_seconds": o["analysis_seconds"]} for task, o in zip(tasks, outcomes)}
        print(f"json: {write_file_atomically(args.json, json.dumps(data, indent=1).encode())}")
    return dict(zip(names, outcomes))


if __name__ == "__main__":
    main()
