"""Step time of a job, side by side: our compiled step (untuned, tuned, tuned + backend switching)
against PyTorch eager and torch.compile running the same step (same frozen set, same optimizer).

    pockengine bench train.py [--tuning-log DIR] [--torch-compile]

Every time is the median of `repeats` steps after warm-up. Ours run in this process, under its
OpenMP setting (library kernels run on one PyTorch thread unless OMP_WAIT_POLICY=PASSIVE, so that
PyTorch's idle OpenMP threads do not spin on the cores TVM's pool needs: torch_kernels.py).
PyTorch runs in fresh processes, once with OpenMP's default and once with PASSIVE, and is credited
with the faster: PASSIVE costs eager ~20% on this machine, so timing it under PASSIVE alone would flatter us.
GFLOP/s counts the step's convolutions and matmuls (forward and backward) over the median time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time

from .sparse import plan_from_json, plan_to_json
from .timing import median_ms

VARIANTS = ("untuned", "tuned", "tuned+switch")
COLUMNS = VARIANTS + ("eager", "torch.compile", "ort")
# The reference peak the benchmarks report against: a large sgemm in PyTorch (MKL) on both cores of
# the machine they were run on (AMD EPYC, 2.45 GHz, AVX2 FMA): torch.matmul of 2048 x 2048 matrices,
# 176 GFLOP/s (1024: 161), measured on 2026-12-05. An earlier figure of 83 GFLOP/s is not
# reproduced by any measurement since; our untuned matmuls reach 140-178 GFLOP/s on the LLM shapes
# (benchmarks/kernel_gflops.py). Not the ceiling either: the CPU's clock varies with load.
PEAK_GFLOPS = 176.0
# torchvision, timm and mcunet for the benchmarks and the model zoo, installed by the Makefile outside
# site-packages: PyPI's torchvision 0.28.0 wheel is a CUDA build whose C++ extension cannot load beside
# the CPU torch, and transformers imports torchvision whenever it is importable.
VISION_PACKAGES = os.path.join(sys.prefix, "vision-packages")
_torchvision_schemas = None


def import_vision_packages() -> bool:
    """Make the vision packages importable (False when they are not installed). Classification needs
    none of torchvision's extension ops; the two schemas its Python side registers kernels for are
    defined first so that it imports."""
    global _torchvision_schemas
    if not os.path.isdir(VISION_PACKAGES):
        return False
    if VISION_PACKAGES not in sys.path:
        sys.path.append(VISION_PACKAGES)
    import torch

    try:
        _ = torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        _torchvision_schemas = torch.library.Library("torchvision", "FRAGMENT")
        _torchvision_schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def save_figure(fig, path: str) -> str:
    """Write a benchmark's matplotlib figure as a PNG at `path` (artifact_files.write_figure)."""
    from .artifact_files import write_figure

    return write_figure(fig, path)


def torch_training_step(job, plan, peer: str = "eager"):
    """PyTorch's step for `job` (forward, loss, backward, optimizer) with `plan`'s frozen set; `peer`
    "eager", "torch.compile" (the model compiled) or "peft" (a LoRA job's adapters as Hugging Face
    PEFT's: peft_lora_model)."""
    import torch

    from .frontend.torch import resolve_loss
    from .sparse import apply_to_torch

    torch.manual_seed(0)
    model = peft_lora_model(job) if peer == "peft" else apply_to_torch(copy.deepcopy(job.model), plan)
    opt = job.optimizer.to_torch([p for p in model.parameters() if p.requires_grad])
    loss_fn = resolve_loss(job.loss)
    forward = torch.compile(model) if peer == "torch.compile" else model
    inputs, target = job.example_inputs, job.example_targets

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(*inputs), target).backward()
        opt.step()

    return step


def peft_lora_model(job):
    """A LoRA job's model with Hugging Face PEFT's adapters in place of ours: each LoRALinear back to
    its nn.Linear (the same weight and bias), `peft.get_peft_model` with the same rank, scale and
    layers (no dropout), and our initial adapters copied into PEFT's, so both train the same numbers.
    PEFT's LoRA needs float base layers: a job on a quantized base is refused."""
    import torch
    from torch import nn

    from .errors import JobError
    from .lora import LoRALinear

    spec = job.sparse_update.lora_spec if job.sparse_update is not None else None
    if spec is None:
        raise JobError(f"{job.name}: PEFT is a peer for LoRA jobs only (SparseUpdate.lora)")
    import peft

    model = copy.deepcopy(job.model)
    adapters = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    quantized = [name for name, m in adapters.items() if not isinstance(m, LoRALinear)]
    if quantized:
        raise JobError(f"{job.name}: PEFT's LoRA needs float base layers; {quantized[0]} is "
                       f"{type(adapters[quantized[0]]).__name__}")
    for name, module in adapters.items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.weight.dtype)
        linear.weight, linear.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    scales = {m.scale for m in adapters.values()}
    config = peft.LoraConfig(r=spec["r"], lora_alpha=spec["r"] * scales.pop(), target_modules=sorted(adapters),
                             lora_dropout=0.0, bias="none")
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, module in adapters.items():
            layer = wrapped.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
    return wrapped


@dataclasses.dataclass(frozen=True)
class JobSource:
    """Where a job comes from, so another process can build the same one: a train.py (its `job`),
    or `factory(*args)` defined in a Python file."""

    script: str
    factory: str | None = None
    args: tuple = ()

    def load(self):
        from .job import load_job

        if self.factory is None:
            return load_job(self.script)
        import runpy

        return runpy.run_path(self.script, run_name="__pockengine_bench__")[self.factory](*self.args)


def step_times(source: JobSource, target="host", tuning_logs=(), repeats: int = 10, peers=("eager",),
               log=sys.stderr, peer_policies=None) -> dict:
    """{column: median ms, "gflop": conv+matmul GFLOP per step, "job": its name, ...} for a job
    (built afresh from `source` for every variant: compiling consumes nothing, but each variant
    starts equal). `peer_policies`: the OpenMP wait policies PyTorch is timed under (default
    PEER_WAIT_POLICIES)."""
    import pockengine as pe

    job_factory = source.load
    row = {}
    variants = {"untuned": ((), "tvm"), "tuned": (tuning_logs, "tvm"), "tuned+switch": (tuning_logs, "auto")}
    for column, (logs, backend) in variants.items():
        if column != "untuned" and not logs:
            continue
        job = job_factory()
        row["job"] = job.name
        print(f"[{job.name}] compiling ({column}) ...", file=log, flush=True)
        program = pe.compile(job, target, tuning_logs=logs, backend=backend)
        row[column] = program.time_step(*job.example_inputs, job.example_targets, repeats=repeats)
        flops = program.memory_report().flops
        row["gflop"] = (flops["forward"] + flops["backward"]) / 1e9
        if column == "tuned":
            row["tuned kernels"] = len(program.meta["tuning"]["tuned"])
        if column == "tuned+switch":
            row["library ops"] = sum(c["calls"] for c in program.meta["backend"]["choices"]
                                     if c["backend"] == "library")
    torch_peers = [c for c in ("eager", "torch.compile") if c in peers]
    if torch_peers:
        print(f"[{job.name}] {', '.join(torch_peers)} (fresh processes) ...", file=log, flush=True)
        row.update(torch_times_in_fresh_processes(source, torch_peers, repeats, peer_policies, plan=program.plan))
    return row


@contextlib.contextmanager
def busy_neighbour():
    """Another process keeping one CPU busy (`while True: pass`) for the duration: a device's camera
    pipeline or web server, as the training step meets them."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # running before the timing starts
        yield
    finally:
        process.kill()
        process.wait()


def neighbour_times(source: JobSource, target="host", repeats: int = 10, log=None, peer_policies=None) -> dict:
    """{"ours": ms, "ours beside": ms, "eager": ms, "eager beside": ms}: the untuned step and
    PyTorch eager's (fresh processes, best_over_wait_policies each time), quiet and beside a
    busy_neighbour. `log`: progress lines (default: the current sys.stderr)."""
    import pockengine as pe

    log = log or sys.stderr

    job = source.load()
    print(f"[{job.name}] compiling ...", file=log, flush=True)
    program = pe.compile(job, target)
    batch = (*job.example_inputs, job.example_targets)
    row = {"job": job.name, "ours": program.time_step(*batch, repeats=repeats)}
    print(f"[{job.name}] eager (fresh processes) ...", file=log, flush=True)
    row["eager"] = torch_times_in_fresh_processes(source, ["eager"], repeats, peer_policies, plan=program.plan)["eager"]
    print(f"[{job.name}] beside a busy process ...", file=log, flush=True)
    with busy_neighbour():
        row["ours beside"] = program.time_step(*batch, repeats=repeats)
        row["eager beside"] = torch_times_in_fresh_processes(source, ["eager"], repeats, peer_policies,
                                                             plan=program.plan)["eager"]
    return row


def neighbour_report(rows: list[tuple[str, str, dict]]) -> str:
    """Quiet and shared step times, ours and PyTorch eager's, and the two slowdowns."""
    head = f"{'workload':<34}{'scheme':<22}{'ours':>10}{'beside':>10}{'slowdown':>10}{'eager':>10}{'beside':>10}" \
           f"{'slowdown':>10}{'ours/eager':>12}"
    lines = [head, "-" * len(head)]
    for title, scheme, row in rows:
        ours, eager = row["ours beside"] / row["ours"], row["eager beside"] / row["eager"]
        lines.append(f"{title[:33]:<34}{scheme[:21]:<22}{row['ours']:>7.1f} ms{row['ours beside']:>7.1f} ms"
                     f"{ours:>9.2f}x{row['eager']:>7.1f} ms{row['eager beside']:>7.1f} ms{eager:>9.2f}x"
                     f"{ours / eager:>11.2f}x")
    lines.append(f"median step times; beside = with another process keeping one of the {os.cpu_count()} CPUs busy; "
                 "ours/eager = our slowdown over eager's (goal <= 1.1)")
    return "\n".join(lines)


# OpenMP wait policies each peer is timed under, in fresh processes (None: unset, OpenMP's default);
# it is credited with its faster one. PASSIVE is what library kernels want beside TVM's threads: measured
# here it cost eager ~20% on MobileNetV2, while ONNX Runtime was faster with it (118 ms) than without (165 ms).
PEER_WAIT_POLICIES = (None, "PASSIVE")


def peer_environment(wait_policy: str | None = None) -> dict:
    """This environment with OMP_WAIT_POLICY set to `wait_policy` (None: unset)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def best_over_wait_policies(measure, columns, policies=None) -> dict:
    """measure(env) -> {column: ms, ...}, run once per policy of `policies` (default
    PEER_WAIT_POLICIES); each column keeps its fastest time, "<column> wait policy" says under
    which policy and "peer wait policies" which were tried. One policy halves the peers' cost: the
    benchmarks' reduced sizes (CI) time them under OpenMP's default only."""
    policies = PEER_WAIT_POLICIES if policies is None else tuple(policies)
    best = {"peer wait policies": " and ".join(policy or "default" for policy in policies)}
    for policy in policies:
        times = measure(peer_environment(policy))
        for key, value in times.items():
            if key in columns and (key not in best or value < best[key]):
                best[key] = value
                best[f"{key} wait policy"] = policy or "default"
            elif key not in columns:
                best.setdefault(key, value)
    return best


def torch_times_in_fresh_processes(source: JobSource, columns, repeats: int, policies=None, plan=None) -> dict:
    """PyTorch's step times for the job, each peer in fresh processes (best_over_wait_policies).
    `plan` (a compiled program's `.plan`) is what PyTorch trains; without it each process imports
    the model again to resolve the job's scheme."""
    request = json.dumps({"source": dataclasses.asdict(source), "columns": list(columns), "repeats": repeats,
                          "plan": None if plan is None else plan_to_json(plan)})
    # torch is imported first, so its OpenMP starts with the child's environment (importing
    # pockengine first would set PASSIVE again).
    code = "import sys, torch; from pockengine.bench import _peer_main; _peer_main(sys.argv[1])"

    def measure(env):
        result = subprocess.run([sys.executable, "-c", code, request], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"timing PyTorch failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    return best_over_wait_policies(measure, columns, policies)


def torch_times(source: JobSource, columns, repeats: int, plan=None) -> dict:
    """Median step times of PyTorch eager, torch.compile and/or PEFT (columns: torch_training_step's
    peers) for the job, in this process, training what `plan` trains (default: the job's plan, from
    an import of the model)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    job = source.load()
    if plan is None:
        plan = job.plan(job.import_model())
    times = {}
    for column in columns:
        step = torch_training_step(job, plan, peer=column)
        start = time.perf_counter()
        step()  # torch.compile compiles here (minutes, cold)
        if column == "torch.compile":
            times["compile s"] = time.perf_counter() - start
        times[column] = median_ms(step, repeats)
    return times


def report(rows: list[tuple[str, str, dict]]) -> str:
    """Times, ratios to eager and achieved GFLOP/s, one block per (workload, scheme, row)."""
    lines = [f"{'workload':<34}{'scheme':<22}" + "".join(f"{c:>14}" for c in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for title, scheme, row in rows:
        lines.append(f"{title[:33]:<34}{scheme[:21]:<22}" + "".join(
            f"{row[c]:>11.1f} ms" if c in row else f"{'-':>14}" for c in COLUMNS))
        if "eager" in row:
            lines.append(f"{'':<34}{'time / eager':<22}" + "".join(
                f"{row[c] / row['eager']:>13.2f}x" if c in row else f"{'':>14}" for c in COLUMNS))
        ours = min(row[c] for c in VARIANTS if c in row)
        gflops = row["gflop"] / (ours / 1e3)
        faster = ", ".join(f"{c} {row[c] / ours:.2f}x" for c in ("eager", "torch.compile", "ort") if c in row)
        lines.append(f"{'':<56}best of ours {ours:.1f} ms: {gflops:.1f} GFLOP/s = "
                     f"{100 * gflops / PEAK_GFLOPS:.0f}% of the {PEAK_GFLOPS:.0f} reference peak "
                     f"({row['gflop']:.3f} GFLOP/step); speed-up over {faster}")
        policies = ", ".join(f"{c} {row[f'{c} wait policy']}" for c in COLUMNS if f"{c} wait policy" in row)
        if policies:
            lines.append(f"{'':<56}peers' faster OMP_WAIT_POLICY: {policies}")
    tried = {row["peer wait policies"] for _, _, row in rows if "peer wait policies" in row}
    peers = "each peer in fresh processes, " + " or ".join(
        (f"the faster of OMP_WAIT_POLICY {t}" if " and " in t else f"under OMP_WAIT_POLICY {t}") for t in sorted(tried)
    ) if tried else "no peer timed"
    lines.append(f"median step time after warm-up; ours in one process; {peers}; time / eager < 1 is faster "
                 "than PyTorch eager")
    return "\n".join(lines)


def _peer_main(request: str) -> None:
    """The fresh process's side of torch_times_in_fresh_processes: PyTorch's times and the process's
    peak resident memory ("peak RSS MiB": building the job, then its steps), printed as JSON."""
    spec = json.loads(request)
    source = spec["source"]
    plan = None if spec.get("plan") is None else plan_from_json(spec["plan"])
    times = torch_times(JobSource(source["script"], source["factory"], tuple(source["args"])), spec["columns"],
                        spec["repeats"], plan)
    print(json.dumps({**times, PEAK_RSS: peak_rss_mib()}))


PEAK_RSS = "peak RSS MiB"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far: its memory's high-water mark (VmHWM), which a new
    program starts afresh. Not getrusage's ru_maxrss: Linux carries that across exec, so a process
    started by a larger one reports at least the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM: peak memory is measured on Linux only")


def runtime_peak_rss(program, steps: int = 3) -> float:
    """The peak resident memory (MiB) of a fresh process that loads `program`'s exported artifact
    and trains `steps` steps on its example batch, as a device would run it: the TVM runtime, numpy
    and the state, no compiler and no PyTorch."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pockengine-rss-") as scratch:
        artifact = program.export(os.path.join(scratch, "artifact"))
        code = ("import sys, json; import pockengine as pe; from pockengine.bench import peak_rss_mib; "
                "p = pe.load(sys.argv[1]); batch = [p.example[s.name] for s in p.signature.batch]; "
                f"[p.step(*batch) for _ in range({int(steps)})]; print(json.dumps(peak_rss_mib()))")
        result = subprocess.run([sys.executable, "-c", code, artifact], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"measuring the artifact's memory failed:\n{result.stderr[-3000:]}")
        return float(result.stdout.strip().splitlines()[-1])
