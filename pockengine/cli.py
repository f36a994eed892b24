"""`pockengine` command line: build | tune | bench | run | inspect | targets | plan-sparse.

    pockengine build train.py --target host -o build/mlp [--tuning-log DIR]
    pockengine tune train.py --target host --trials 500 -o tuning_logs/host/mlp [--time-budget 600]
    pockengine bench train.py [--tuning-log DIR] [--torch-compile]
    pockengine run build/mlp --steps 20 [--data batches.npz] [--save] [--threads N]
    pockengine inspect build/mlp
    pockengine targets
    pockengine plan-sparse train.py --target cortex-m4 --budget 200KB -o build/scheme.json

Errors a user can cause print one line (`error: ...`) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from .artifact_files import check_destination, check_writable, read_manifest
from .errors import InputError, PockEngineError
from .targets.device_runner import locked, positive_int
from .tuning.database import MIN_FLOP_SHARE


def _parse_target(text: str):
    """--target takes a preset name, a TVM tag or a JSON target dict."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PockEngineError(f"--target looks like JSON but does not parse: {e}") from None
    return text


def _tuning_logs(explicit: str | None, target_name: str) -> list[str]:
    """--tuning-log DIR (a database or a directory of them), else every database under
    ./tuning_logs/<target>/ if there is one. Only an explicit directory that does not exist is an error."""
    from .tuning.database import log_directories

    if explicit is not None:
        if not os.path.isdir(explicit):
            raise InputError(f"--tuning-log {explicit}: no such directory")
        found = log_directories(explicit)
        if not found:
            print(f"warning: {explicit} holds no tuning database; building with default schedules", file=sys.stderr)
        return found
    default = os.path.join("tuning_logs", target_name)
    return log_directories(default) if os.path.isdir(default) else []


def cmd_build(args) -> int:
    if args.output:  # first: before the seconds of importing TVM, running the user's script and compiling
        check_destination(args.output, args.force, protect=(args.train_py,))
    from .targets import resolve

    # Fail fast: a preset's name and its tools are checked without TVM, before the user's script runs.
    target = resolve(_parse_target(args.target))
    target.check_tools("build")
    from . import compile as compile_job
    from .job import load_job
    from .tuning.database import check_log

    logs = _tuning_logs(args.tuning_log, target.name)
    for log in logs:  # a damaged database is named before the user's script runs
        check_log(log)
    job = load_job(args.train_py)
    out = args.output or os.path.join("build", job.name)
    if not args.output:
        check_destination(out, args.force, protect=(args.train_py,))
    print(f"building {args.train_py} (job {job.name!r}) for target {target.name}", file=sys.stderr)
    start = time.perf_counter()
    program = compile_job(job, target, tuning_logs=logs, backend=args.backend, patches=args.patches,
                          verbose=not args.quiet)
    program.export(out, force=args.force)  # with the example batch: `pockengine run` works without --data
    report = program.memory_report()
    _print_summaries(program.meta)
    if report.patches:
        print(report.patches_summary())
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s; "
          f"planned peak memory {report.peak_bytes / 2**20:.2f} MiB")
    if target.runner != "this machine":
        print(f"run it with `pockengine run {out} --steps N` ({target.runner})")
    return 0


SEARCH_DATA = ("train_batches", "eval_batches")  # what plan-sparse reads from a train.py besides `job`


def cmd_plan_sparse(args) -> int:
    from .targets import resolve

    target = resolve(_parse_target(args.target))
    budget = None
    if args.budget is not None:
        from .sparse_search import parse_budget

        budget = parse_budget(args.budget)  # a bad size is named before the user's script runs
    elif not target.sram_bytes:
        raise InputError(f"plan-sparse: {target.name} has no SRAM size to take as the budget; give --budget "
                         "(bytes or a size such as 256KB)")
    from . import search_sparse_update
    from .job import load_script

    scope = load_script(args.train_py)
    missing = [name for name in SEARCH_DATA if scope.get(name) is None]
    if missing:
        raise InputError(f"{args.train_py} defines no {' or '.join(missing)}: plan-sparse trains on `train_batches` "
                         "and scores on `eval_batches`, module-level lists of (inputs..., target) batches shaped as "
                         "the job's example batch")
    job = scope["job"]
    out = args.output or os.path.join("build", f"{job.name}.sparse.json")
    plot = args.plot or os.path.splitext(out)[0] + ".png"
    for path in (out, plot):
        _check_result_destination(path, args.force, args.train_py)
    print(f"searching the sparse update of {args.train_py} (job {job.name!r}) for {target.name}", file=sys.stderr)
    options = {"steps": args.steps} if args.steps else {}
    result = search_sparse_update(job, budget, data=scope["train_batches"], eval_data=scope["eval_batches"],
                                  target=target, weight_layers=args.weight_layers, **options)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result.save(out)
    result.plot(plot)
    print(result.report())
    print(f"wrote {out} and {plot}; train with it: sparse_update=pockengine.SparseUpdate.load({out!r})")
    return 0


def _check_result_destination(path: str, force: bool, script: str) -> None:
    """plan-sparse overwrites its own results only (a JSON with a "scheme", a PNG beside one)."""
    if not os.path.exists(path) or force:
        if os.path.isdir(path) or os.path.abspath(path) == os.path.abspath(script):
            raise InputError(f"{path} is {'a directory' if os.path.isdir(path) else 'the script'}; give another -o")
        return
    json_path = os.path.splitext(path)[0] + ".json"
    try:
        with open(json_path) as f:
            ours = isinstance(json.load(f).get("scheme"), dict)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise InputError(f"{path} exists and is not an earlier plan-sparse result; give another -o or --force to "
                         "replace it")


def _print_summaries(meta: dict, detailed: bool = False) -> None:
    """What the build took from tuning logs, then what the artifact's family says of it."""
    from .targets.families import family
    from .tuning.database import TuningReport

    if "tuning" in meta:
        print(TuningReport.from_json(meta["tuning"]).summary())
    summary = family(meta).summary(meta, detailed)
    if summary:
        print(summary)


def cmd_tune(args) -> int:
    from .job import load_job
    from .targets import resolve
    from .tuning.search import RPCTracker, tune

    target = resolve(_parse_target(args.target))
    rpc = RPCTracker.parse(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
    job = load_job(args.train_py)
    out = args.output or os.path.join("tuning_logs", target.name, job.name)
    os.makedirs(out, exist_ok=True)
    check_writable(out)  # an existing database MetaSchedule could not add its records to
    with locked(out):  # two tuners on one database would each rewrite it without the other's records
        result = tune(job, target, args.trials, out, time_budget_s=args.time_budget, rpc=rpc,
                      min_flop_share=args.min_share)
    print(f"{result['trials_run']} trials run ({result['already']} were already in the log); database: {out}")
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .targets import resolve

    target = resolve(_parse_target(args.target))
    logs = _tuning_logs(args.tuning_log, target.name)
    peers = ("eager", "torch.compile") if args.torch_compile else ("eager",)
    row = bench.step_times(bench.JobSource(args.train_py), target, logs, args.repeats, peers)
    print(bench.report([(row["job"], "as in train.py", row)]))
    return 0


def _without_pytorch(calls_its_kernels: bool = False) -> None:
    """Keep PyTorch out of a `run`, `inspect` or `targets` process when no artifact calls its kernels:
    importing TVM imports PyTorch whenever it is installed (tvm_ffi loads it first, against a symbol
    conflict seen on Windows), which is half of the command's start-up (2.5 of 5 s here, more on a
    Raspberry Pi). tvm_ffi, like the runtime, treats an ImportError as "no PyTorch"."""
    if "torch" not in sys.modules and not calls_its_kernels:
        sys.modules["torch"] = None  # `import torch` raises ImportError


def cmd_run(args) -> int:
    manifest = read_manifest(args.artifact)
    if manifest.get("kind") == "inference":
        from .errors import InputError

        raise InputError(f"{args.artifact} is an inference artifact (pockengine.compile_inference): `pockengine run` "
                         "trains, and it trains nothing. Load it with pockengine.load and call it on the model's "
                         "inputs, program(x)")
    _without_pytorch(calls_its_kernels=bool(manifest.get("backend", {}).get("library_kernels")))
    from .runtime import load
    from .targets.families import family as family_of
    from .targets.family import RunOptions

    family = family_of(manifest)
    options = RunOptions(args.steps, args.data, args.save, args.threads)
    if args.save:  # before the steps, which may take long on a device, not when their result is saved
        check_writable(args.artifact)
    # Saving: locked from reading the state to writing it back, so concurrent runs lose no step
    # (unless the family's own runner locks it).
    with locked(args.artifact) if args.save and family.run_locks_artifact else contextlib.nullcontext():
        return family.run(args.artifact, options, load)


def cmd_inspect(args) -> int:
    m = read_manifest(args.artifact)
    _without_pytorch()  # inspect runs nothing
    from .analysis.memory_plan import MemoryReport

    absent = [name for name in m["files"].values() if not os.path.exists(os.path.join(args.artifact, name))]
    if absent and not args.json:
        from .errors import ArtifactError

        raise ArtifactError(f"{args.artifact} is incomplete: {', '.join(absent)} missing; rebuild it with "
                            "`pockengine build` (inspect --json prints the manifest anyway)")
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    sig = m["signature"]
    print(f"artifact   {args.artifact}")
    print(f"job        {m['name']} ({m['source']})")
    print(f"target     {m['target']} ({m.get('family', 'host')})  {json.dumps(m['tvm_target'])}")
    if "optimizer" in m:
        opt = {k: v for k, v in m["optimizer"].items() if k != "kind"}
        print(f"optimizer  {m['optimizer']['kind']}({', '.join(f'{k}={v}' for k, v in opt.items())})")
    else:
        print("kind       inference (pockengine.compile_inference): the model's forward, nothing trained")
    print("inputs     " + ", ".join(f"{b['name']} {tuple(b['shape'])} {b['dtype']}" for b in sig["batch"]))
    if "output" in m:
        print(f"output     {tuple(m['output']['shape'])} {m['output']['dtype']}")
    params = m["parameters"]
    trained = [p for p in params if p["trained"]]
    n_el = lambda ps: sum(int(np.prod(p["shape"], dtype=np.int64)) for p in ps)
    print(f"parameters {len(params)} tensors, {n_el(params):,} values; trained {len(trained)} tensors, "
          f"{n_el(trained):,} values; buffers {len(m['buffers'])}")
    print("versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print()
    _print_summaries(m, detailed=True)
    print()
    report = MemoryReport.from_json(m["memory"])
    print(report)
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0


def cmd_targets(args) -> int:
    _without_pytorch()  # the host preset asks TVM for this CPU's name; nothing here needs PyTorch
    from .targets import ALIASES, presets
    from .targets.families import family

    if args.missing_packages:  # for set-up scripts: `apt-get install $(pockengine targets --missing-packages)`
        missing = {package for preset in presets().values() for tool in preset.missing_tools()
                   for package in tool.package.split()}
        print(" ".join(sorted(missing)))
        return 0
    for name, preset in presets().items():
        status = []
        for purpose in ("build", "run"):
            missing = preset.missing_tools(purpose)
            tools = [t.program for t in preset.tools if t.purpose == purpose]
            if purpose == "run" and (run_status := family(preset).run_status(preset)) is not None:
                status.append(run_status)
                continue
            if missing:
                packages = " ".join(sorted({t.package for t in missing}))
                status.append(f"{purpose}: missing {', '.join(t.program for t in missing)} "
                              f"(apt-get install {packages})")
            else:
                status.append(f"{purpose}: ready" + (f" ({', '.join(tools)})" if tools else ""))
        memory = (f"; SRAM {preset.sram_bytes // 1024} KiB, Flash {preset.flash_bytes // 1024} KiB"
                  if preset.sram_bytes else "")
        print(f"{name:<22}{preset.family:<10}{preset.description}{memory}")
        print(f"{'':<22}{'':<10}{'; '.join(status)}; runs on {preset.runner}")
        print(f"{'':<22}{'':<10}{json.dumps(preset.tvm_target)}")
    print("aliases: " + ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items()))
    print("--target also takes a TVM tag (e.g. nvidia/jetson-agx-orin-64gb) or a JSON target dict.")
    return 0


def _patches(text: str):
    """`--patches`: "auto", or MODULE:GRID as pockengine.compile's (module path, grid)."""
    if text == "auto":
        return text
    module, _, grid = text.rpartition(":")
    if not module or not grid.isdigit() or int(grid) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or MODULE:GRID, e.g. features.3:3")
    return module, int(grid)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pockengine", description="Compile and run training steps with TVM.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="compile the `job` of a train.py into an artifact directory")
    b.add_argument("train_py")
    b.add_argument("--target", default="host", help="preset name, TVM tag or JSON target dict (default: host)")
    b.add_argument("-o", "--output", help="artifact directory (default: build/<job name>)")
    b.add_argument("--force", action="store_true",
                   help="replace what is at -o even if it is not a PockEngine artifact (its files are deleted)")
    b.add_argument("-q", "--quiet", action="store_true", help="do not show the build stages")
    b.add_argument("--backend", choices=("tvm", "library", "auto"), default="tvm",
                   help="heavy ops on TVM kernels (default), PyTorch's library kernels, or whichever measures faster")
    b.add_argument("--tuning-log", metavar="DIR",
                   help="MetaSchedule database (or directory of them) to apply "
                        "(default: tuning_logs/<target>/ if present)")
    b.add_argument("--patches", type=_patches, default=None, metavar="auto|MODULE:GRID",
                   help="run the forward's frozen first layers patch by patch: `auto` where that lowers the "
                        "peak memory, or up to MODULE's output on a GRIDxGRID grid (default: not)")
    b.set_defaults(func=cmd_build)

    tu = sub.add_parser("tune", help="tune the kernels of a train.py's training step with MetaSchedule")
    tu.add_argument("train_py")
    tu.add_argument("--target", default="host", help="preset name, TVM tag or JSON target dict (default: host)")
    tu.add_argument("--trials", type=int, default=1000,
                    help="total measured trials, including those already in the log")
    tu.add_argument("-o", "--output", help="database directory (default: tuning_logs/<target>/<job name>)")
    tu.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="stop building new candidates this many seconds after the command starts (measured "
                         "rounds are kept)")
    tu.add_argument("--min-share", type=float, default=MIN_FLOP_SHARE,
                    help=f"tune kernels with at least this share of the step's FLOPs (default {MIN_FLOP_SHARE})")
    tu.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on devices registered with this RPC tracker")
    tu.add_argument("--rpc-key", help="the device key registered with the tracker")
    tu.set_defaults(func=cmd_tune)

    be = sub.add_parser("bench", help="time the compiled step (untuned, tuned, tuned+switching) against PyTorch")
    be.add_argument("train_py")
    be.add_argument("--target", default="host", help="preset name, TVM tag or JSON target dict (default: host)")
    be.add_argument("--tuning-log", metavar="DIR", help="as for build (default: tuning_logs/<target>/ if present)")
    be.add_argument("--repeats", type=int, default=10)
    be.add_argument("--torch-compile", action="store_true", help="also time torch.compile (minutes of cold compile)")
    be.set_defaults(func=cmd_bench)

    r = sub.add_parser("run", help="run training steps of an artifact, printing the loss")
    r.add_argument("artifact")
    r.add_argument("--steps", type=positive_int, default=10)
    r.add_argument("--data", help=".npz with one array per input (optionally with a leading axis of batches)")
    r.add_argument("--save", action="store_true", help="write the trained state back into the artifact")
    r.add_argument("--threads", type=positive_int, help="worker threads for the kernels (host, aarch64, CUDA's host "
                   "side; default: the CPUs available to this process)")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="show an artifact's manifest and memory plan")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--plot", metavar="PNG", help="draw the step's memory timeline (and the full update's) to a PNG")
    i.set_defaults(func=cmd_inspect)

    ps = sub.add_parser("plan-sparse", help="search the sparse-update scheme of a train.py that fits a memory "
                        "budget on a target (its `train_batches` and `eval_batches` score the candidates)")
    ps.add_argument("train_py")
    ps.add_argument("--target", default="host", help="preset name, TVM tag or JSON target dict (default: host)")
    ps.add_argument("--budget", help="training memory: bytes or a size such as 256KB (default: the target's SRAM)")
    ps.add_argument("-o", "--output", help="the result's JSON (default: build/<job name>.sparse.json)")
    ps.add_argument("--plot", metavar="PNG", help="accuracy against memory (default: beside the JSON)")
    ps.add_argument("--steps", type=positive_int, help="training steps of each candidate's run (default: one pass "
                    "over train_batches)")
    ps.add_argument("--weight-layers", type=positive_int, default=6,
                    help="how many layers before the classifier may train weights (default 6)")
    ps.add_argument("--force", action="store_true", help="replace files at -o / --plot that are not earlier results")
    ps.set_defaults(func=cmd_plan_sparse)

    t = sub.add_parser("targets", help="list target presets and whether this machine can build them")
    t.add_argument("--missing-packages", action="store_true",
                   help="print only the Debian packages that would provide the missing tools")
    t.set_defaults(func=cmd_targets)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except PockEngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: name the file and what to do
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            # `pockengine targets | head`: the reader has what it wanted. Stop quietly as other tools do
            # (128 + SIGPIPE); stdout goes to /dev/null so that Python's flush at exit does not complain.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"error: {os_error_message(e, _elsewhere(args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept (artifacts and state are replaced atomically)",
              file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line, the traceback on request
        if os.environ.get("POCKENGINE_TRACEBACK"):
            raise
        print(f"error: internal error ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); this is "
              "a bug in PockEngine, please report it (set POCKENGINE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 3


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (Linux reports POLLERR on its write end), as
    opposed to a broken socket elsewhere (an RPC session), which is an error to report."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def os_error_message(e: OSError, elsewhere: str = "") -> str:
    """The file and what to do; `elsewhere` says how this command writes somewhere else ("-o")."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    hint = f" ({elsewhere})" if elsewhere else ""
    fixes = {errno.ENOSPC: f"the disk is full: free space or write elsewhere{hint}",
             errno.EDQUOT: f"the disk quota is exhausted: free space or write elsewhere{hint}",
             errno.EACCES: f"permission denied: fix its permissions, or use another path{hint}",
             errno.EROFS: f"the file system is read-only: use another directory{hint}",
             errno.ENOENT: "no such file or directory"}
    return where + fixes.get(e.errno, e.strerror or str(e))


def _elsewhere(args) -> str:
    """How the command in `args` is told to write somewhere else."""
    if hasattr(args, "output"):
        return "-o"
    return "a copy of the artifact" if getattr(args, "save", False) else ""


if __name__ == "__main__":
    sys.exit(main())
