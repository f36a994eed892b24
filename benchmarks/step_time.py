"""Training step time: PockEngine (untuned, tuned, tuned + backend switching) vs PyTorch eager vs
torch.compile vs ONNX Runtime training, on the same step with the same frozen set.

    python benchmarks/step_time.py                 # the workloads below, full size
    python benchmarks/step_time.py --small         # reduced sizes (what CI runs)
    python benchmarks/step_time.py --tune 1800     # tune each workload for up to 1800 s into tuning_logs/host/
    python benchmarks/step_time.py --neighbour     # quiet and beside a busy process: ours vs eager's slowdown

Workloads: MobileNetV2-0.35 at 8x3x128x128 (full update and MCUNetV3-style sparse update), a
4-layer transformer classifier (d_model 128, seq 128, batch 8; full and last-2-blocks + biases),
a plain CNN of 3x3 convolutions at 64x64 (batch 8) and torchvision's ResNet-18 at 64x64 and
128x128, batch 1 and 8 (full update).
Every time is the median of `--repeats` steps after warm-up: ours in this process, PyTorch's and
ONNX Runtime's in fresh processes, each the faster of OMP_WAIT_POLICY unset and PASSIVE (see
pockengine.bench; --small: unset only, half the peers' cost).
GFLOP/s = the step's conv and matmul FLOPs (counted on the compiled graph) / median time, against
a reference peak (pockengine.bench.PEAK_GFLOPS: a large MKL sgemm, torch.matmul, on both cores).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: its OpenMP threads share cores with TVM's
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "examples", "mobilenetv2"), os.path.join(ROOT, "examples", "transformer")]

from mobilenetv2 import MobileNetV2  # noqa: E402
from model import TransformerClassifier  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench  # noqa: E402
from pockengine.sparse import SparseUpdate  # noqa: E402
from pockengine.tuning import database, search  # noqa: E402

TUNING_LOGS = os.path.join(ROOT, "tuning_logs", "host")


def mobilenet_sparse(model) -> SparseUpdate:
    """MCUNetV3-style: biases of the last 22 layers, four late weights (two of them in part)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    last = len(convs) - 1
    return SparseUpdate.mcunetv3(22, [last - 9, last - 6, last - 3, last], [1, 0.5, 0.25, 1])


def transformer_sparse(model) -> SparseUpdate:
    """The last two encoder blocks and the head fully, every other bias too."""
    n = len(model.layers)
    return SparseUpdate.bias_only() | {f"layers.{n - 2}": "full", f"layers.{n - 1}": "full", "head": "full"}


def workloads(small: bool = False) -> list[dict]:
    """name, model factory, example batch and schemes (scheme name -> SparseUpdate factory)."""
    g = torch.Generator().manual_seed(0)
    res, batch, seq, d_model, layers = (32, 2, 16, 32, 4) if small else (128, 8, 128, 128, 4)
    return [
        dict(name="mobilenetv2", title=f"MobileNetV2-0.35 {res}x{res} b{batch}",
             model=lambda: MobileNetV2(num_classes=10, width_mult=0.35),
             x=torch.randn(batch, 3, res, res, generator=g), y=torch.randint(0, 10, (batch,), generator=g),
             schemes={"full": lambda m: SparseUpdate.full(), "mcunetv3-sparse": mobilenet_sparse}),
        dict(name="transformer", title=f"Transformer d{d_model} x{layers} seq{seq} b{batch}",
             model=lambda: TransformerClassifier(d_in=16, d_model=d_model, heads=4, classes=10, layers=layers,
                                                 ffn=4 * d_model),
             x=torch.randn(batch, seq, 16, generator=g), y=torch.randint(0, 10, (batch,), generator=g),
             schemes={"full": lambda m: SparseUpdate.full(), "last-2-blocks+biases": transformer_sparse}),
        dict(name="plain-cnn", title=f"plain CNN {res // 2}x{res // 2} b{batch}",
             model=plain_cnn, x=torch.randn(batch, 3, res // 2, res // 2, generator=g),
             y=torch.randint(0, 10, (batch,), generator=g), schemes={"full": lambda m: SparseUpdate.full()}),
    ] + [
        dict(name=f"resnet18-{size}-b{i}", title=f"torchvision ResNet-18 {r}x{r} b{b}", model=resnet18,
             x=torch.randn(b, 3, r, r, generator=g), y=torch.randint(0, 10, (b,), generator=g),
             schemes={"full": lambda m: SparseUpdate.full()})
        for size, r in (("low", res // 2), ("high", res)) for i, b in ((1, 1), (8, batch))
    ]


def plain_cnn():
    """Regular 3x3 convolutions, a 3-channel stem: what every ResNet/VGG-style network runs."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def resnet18():
    if not bench.import_vision_packages():
        raise SystemExit(f"torchvision is not installed in {bench.VISION_PACKAGES}: run `make setup`")
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def optimizer():
    return pe.optim.SGD(lr=0.01, momentum=0.9)


def make_job(workload: dict, scheme: str) -> pe.TrainingJob:
    torch.manual_seed(0)
    model = workload["model"]().train()
    return pe.TrainingJob(copy.deepcopy(model), (workload["x"],), workload["y"], "cross_entropy", optimizer(),
                          sparse_update=workload["schemes"][scheme](model), name=f"{workload['name']}-{scheme}")


def job_for(name: str, scheme: str, small: bool) -> pe.TrainingJob:
    """The job of workload `name` (as in workloads(small)) and `scheme`: what another process builds."""
    return make_job(next(w for w in workloads(small) if w["name"] == name), scheme)


def tune_all(budget_s: float, trials: int, small: bool, only: str | None = None, scheme: str | None = None,
             min_flop_share: float = database.MIN_FLOP_SHARE) -> None:
    """Tune every workload's step into tuning_logs/host/<workload>/ (resumable): the full update
    first, then the sparse scheme, whose kernels are mostly the same and already have records."""
    for workload in workloads(small):
        if only and workload["name"] != only:
            continue
        for name in workload["schemes"]:
            if scheme is None or name == scheme:
                search.tune(make_job(workload, name), "host", trials, os.path.join(TUNING_LOGS, workload["name"]),
                            time_budget_s=budget_s, min_flop_share=min_flop_share)


def measure(workload: dict, scheme: str, small: bool, repeats: int, peers: set, log=sys.stderr,
            target="host") -> dict:
    """{column: median ms, ...} for one workload and scheme (pockengine.bench), ONNX Runtime added.
    At reduced size (CI) the peers are timed under OpenMP's default wait policy only."""
    policies = (None,) if small else None
    logs = database.log_directories(os.path.join(TUNING_LOGS, workload["name"]))
    if not logs:
        print(f"no tuning log under {TUNING_LOGS}/{workload['name']}: run --tune first", file=log)
    source = bench.JobSource(os.path.abspath(__file__), "job_for", (workload["name"], scheme, small))
    row = bench.step_times(source, target, logs, repeats, peers, log, peer_policies=policies)
    if "ort" in peers:
        job = make_job(workload, scheme)
        print(f"[{job.name}] ONNX Runtime training ...", file=log, flush=True)
        row.update(measure_ort(job, job.plan(job.import_model()), workload["x"], workload["y"], repeats, policies))
    return row


ORT_VENV = os.path.join(ROOT, ".venv-ort")
# torch: onnxruntime.training imports it (its CPU wheel, pinned as in the main environment)
ORT_PACKAGES = ("torch==2.13.0", "onnxruntime-training-cpu==1.19.2", "onnx==1.16.2", "numpy<2")


def ort_python(log=sys.stderr) -> str:
    """The interpreter of the ONNX Runtime training environment, created on first use."""
    import subprocess

    python = os.path.join(ORT_VENV, "bin", "python")
    if not os.path.exists(os.path.join(ORT_VENV, ".installed")):
        print(f"creating {ORT_VENV} ({', '.join(ORT_PACKAGES)}) ...", file=log, flush=True)
        subprocess.run(["python3", "-m", "venv", ORT_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *ORT_PACKAGES], check=True)
        open(os.path.join(ORT_VENV, ".installed"), "w").close()
    return python


def measure_ort(job, plan, x, y, repeats: int, policies=None) -> dict:
    """Export the model (training mode) to ONNX here; ORT builds and times its training step in its
    own environment. Same frozen set; channel-ratio weights are trained whole (ORT cannot mask)."""
    import json
    import subprocess
    import tempfile

    import numpy as np

    from pockengine.sparse import FROZEN

    model = copy.deepcopy(job.model).train()
    trained = [n for n, _ in model.named_parameters() if plan[n] != FROZEN]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (x,), onnx_path, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False, input_names=["x"], output_names=["logits"],
                          opset_version=14)  # LayerNormalization (opset 17) has no gradient in ORT 1.19
        np.savez(os.path.join(tmp, "batch.npz"), x=x.numpy(), y=y.numpy().astype("int64"))
        with open(os.path.join(tmp, "trained.json"), "w") as f:
            json.dump(trained, f)
        command = [ort_python(), os.path.join(HERE, "ort_training.py"), onnx_path, os.path.join(tmp, "batch.npz"),
                   os.path.join(tmp, "trained.json"), str(repeats)]

        def measure(env):
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"ONNX Runtime training failed:\n{result.stderr[-3000:]}")
            return {"ort": json.loads(result.stdout.strip().splitlines()[-1])["ms"]}

        return bench.best_over_wait_policies(measure, ["ort"], policies)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced sizes (for CI)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tune", type=float, metavar="SECONDS", help="tune each workload and scheme for this long")
    parser.add_argument("--trials", type=int, default=4000, help="with --tune: trials per workload and scheme")
    parser.add_argument("--only", choices=[w["name"] for w in workloads(True)], help="one workload")
    parser.add_argument("--scheme", help="one scheme (e.g. full)")
    parser.add_argument("--min-share", type=float, default=database.MIN_FLOP_SHARE,
                        help="with --tune: tune kernels with at least this share of the step's FLOPs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of cold compile)")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime training (its own venv)")
    parser.add_argument("--target", default="host",
                        help="what ours is built for (default host: the preset the shipped logs were tuned for)")
    parser.add_argument("--neighbour", action="store_true",
                        help="ours (untuned) and PyTorch eager, quiet and beside a busy process: the two slowdowns")
    args = parser.parse_args(argv)
    if args.tune:
        tune_all(args.tune, args.trials, args.small, args.only, args.scheme, args.min_share)
        return []
    torch.set_num_threads(os.cpu_count() or 1)
    if args.neighbour:
        return neighbour_table(args)
    peers = {"eager"} | (set() if args.no_compile else {"torch.compile"}) | (set() if args.no_ort else {"ort"})
    rows = []
    for workload, scheme in chosen(args):
        rows.append((workload["title"], scheme, measure(workload, scheme, args.small, args.repeats, peers,
                                                        target=args.target)))
        print(bench.report(rows[-1:]), file=sys.stderr, flush=True)
    print(bench.report(rows))
    return rows


def chosen(args) -> list:
    """(workload, scheme) pairs that --only and --scheme select."""
    return [(w, scheme) for w in workloads(args.small) if not args.only or w["name"] == args.only
            for scheme in w["schemes"] if not args.scheme or scheme == args.scheme]


def neighbour_table(args) -> list:
    rows = []
    policies = (None,) if args.small else None
    for workload, scheme in chosen(args):
        source = bench.JobSource(os.path.abspath(__file__), "job_for", (workload["name"], scheme, args.small))
        rows.append((workload["title"], scheme, bench.neighbour_times(source, args.target, args.repeats,
                                                                      peer_policies=policies)))
        print(bench.neighbour_report(rows[-1:]), file=sys.stderr, flush=True)
    print(bench.neighbour_report(rows))
    return rows


if __name__ == "__main__":
    main()
