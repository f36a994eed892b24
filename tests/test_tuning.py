"""MetaSchedule tuning of the training step: a small real tuning run (local and over RPC on loopback),
its database applied by the build, and what happens with stale, corrupt and missing logs."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import pockengine as pe
from conftest import MLP, ROOT, make_batches, max_scaled_diff, train_torch
from pockengine.errors import InputError
from pockengine.tuning import database, search

TRIALS = 32  # two rounds: the two costliest kernels get a tuned schedule
# Tuned kernels sum in a different order than the default schedule: float32 rounding, not a wrong result.
TUNED_VS_UNTUNED_TOL = 1e-5
VS_TORCH_TOL = 1e-3
STEPS = 5


def mlp_job(model=None, batch=8):
    model = model or MLP()
    x, y = make_batches((batch, 32), 10, 1)[0]
    return pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.05, momentum=0.9))


@pytest.fixture(scope="module")
def mlp_log(tmp_path_factory):
    torch.manual_seed(0)
    model = MLP()
    log = str(tmp_path_factory.mktemp("tuning") / "mlp")
    before = os.environ.get("TVM_NUM_THREADS")
    result = search.tune(mlp_job(model), "host", TRIALS, log)
    assert os.environ.get("TVM_NUM_THREADS") == before  # set for MetaSchedule's workers only while tuning
    return model, log, result


def pool_workers() -> int:
    """TVM's thread pool size in the calling thread (run in the runner's worker process)."""
    import tvm

    return tvm.get_global_func("runtime.NumThreads")()


def test_the_runner_measures_on_the_targets_cores_without_environment_variables(monkeypatch, tmp_path):
    """The local runner's worker configures its thread pool itself (an initializer calling TVM's
    thread-pool API), instead of inheriting TVM_NUM_THREADS set for it."""
    import cloudpickle
    from tvm.s_tir import meta_schedule as ms

    from pockengine import targets

    seen = {}

    def tune_tasks(*, runner, **_):
        seen["TVM_NUM_THREADS"] = os.environ.get("TVM_NUM_THREADS")
        seen["workers"] = runner.pool.submit(pool_workers).result()

    monkeypatch.setattr(ms.tune, "tune_tasks", tune_tasks)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)  # TVM's default would otherwise size the pool
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    try:
        search.tune(mlp_job(), "host", 16, str(tmp_path / "log"))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert seen == {"TVM_NUM_THREADS": None, "workers": targets.resolve("host").cores}


def test_tuning_writes_a_database_that_resumes(mlp_log):
    model, log, result = mlp_log
    assert result["trials_run"] >= TRIALS and result["best_ms"]
    with open(os.path.join(log, database.RECORD_FILE)) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(log, database.WORKLOAD_FILE)) as f:
        workloads = [json.loads(line) for line in f if line.strip()]
    assert len(records) >= TRIALS - 2  # a few candidates may fail to build; they are not recorded
    assert {r[0] for r in records} <= set(range(len(workloads)))
    measured = [r for r in records if r[1][1]]
    assert measured and all(float(t) > 0 for r in measured for t in r[1][1])
    database.open_log(log)  # MetaSchedule itself reads it back
    again = search.tune(mlp_job(model), "host", TRIALS, log)  # resumed: nothing left to run
    assert again["trials_run"] == 0 and again["already"] >= TRIALS - 2



def test_open_logs_reads_a_database_once_until_it_changes(mlp_log):
    _, log, _ = mlp_log
    first = database.open_logs([log])
    assert database.open_logs([log]) is first  # an auto build asks three times
    record = os.path.join(log, database.RECORD_FILE)
    stat = os.stat(record)
    os.utime(record, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a resumed tuning run would
    assert database.open_logs([log]) is not first

def test_tuned_build_matches_untuned_and_pytorch(mlp_log):
    model, log, result = mlp_log
    batches = make_batches((8, 32), 10, STEPS)
    tuned = pe.compile(mlp_job(model), "host", tuning_logs=[log])
    untuned = pe.compile(mlp_job(model), "host")
    report = database.TuningReport.from_json(tuned.meta["tuning"])
    assert report.logs == [log] and report.tuned, report
    assert set(result["best_ms"]) <= set(report.tuned)  # every kernel measured in tuning runs tuned
    assert not untuned.meta["tuning"]["tuned"]
    for x, y in batches:
        tuned.step(x, y)
        untuned.step(x, y)
    reference = copy.deepcopy(model)
    train_torch(reference, pe.optim.SGD(lr=0.05, momentum=0.9), batches)
    worst, where = max_scaled_diff(tuned.state_dict(), untuned.state_dict())
    assert worst < TUNED_VS_UNTUNED_TOL, (worst, where)
    worst, where = max_scaled_diff(tuned.state_dict(), reference.state_dict())
    assert worst < VS_TORCH_TOL, (worst, where)


def test_stale_log_falls_back_to_default_schedules(mlp_log):
    _, log, _ = mlp_log
    other = pe.compile(mlp_job(MLP(d_in=32, hidden=48), batch=4), "host", tuning_logs=[log])
    report = database.TuningReport.from_json(other.meta["tuning"])
    assert report.tuned == [] and report.fallback
    assert other.step(*make_batches((4, 32), 10, 1)[0]) > 0


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pockengine.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_time_budget_stops_tuning_cleanly(tmp_path):
    log = str(tmp_path / "budget")
    lines = []

    class Lines:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    # 1000 trials would take half an hour; the budget is used up by the step's compile, before the
    # first search round (a round, once begun, cannot be stopped: half a minute here)
    result = search.tune(mlp_job(), "host", 1000, log, time_budget_s=0.001, stream=Lines())
    assert result["trials_run"] == 0
    assert any("time budget of 0.001 s used up" in line for line in lines)
    with open(os.path.join(log, database.RECORD_FILE)) as f:
        assert not [line for line in f if line.strip()]  # skipped candidates are not recorded as failures
    database.open_log(log)


@pytest.mark.parametrize("budget", [0, -5, float("nan")])
def test_a_time_budget_that_is_not_positive_is_refused(budget, tmp_path):
    with pytest.raises(InputError, match="--time-budget must be a positive number"):
        search.tune(mlp_job(), "host", 10, str(tmp_path / "log"), time_budget_s=budget)
    assert not (tmp_path / "log").exists()


def test_build_names_a_corrupt_log(mlp_log, tmp_path):
    _, log, _ = mlp_log
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (database.WORKLOAD_FILE, database.RECORD_FILE):
        (bad / name).write_text(open(os.path.join(log, name)).read())
    with open(bad / database.RECORD_FILE, "a") as f:
        f.write('[0, [["truncated\n')
    r = _cli("build", "examples/mlp_digits/train.py", "--tuning-log", str(bad), "-o", str(tmp_path / "out"), "-q")
    assert r.returncode == 2
    assert f"{bad / database.RECORD_FILE}: line" in r.stderr and "corrupt" in r.stderr and "Traceback" not in r.stderr
    r = _cli("build", "examples/mlp_digits/train.py", "--tuning-log", str(tmp_path / "nowhere"), "-q")
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_rpc_options_are_checked():
    with pytest.raises(InputError, match="HOST:PORT"):
        search.RPCTracker.parse("localhost", "k")
    with pytest.raises(InputError, match="--rpc-key"):
        search.RPCTracker.parse("localhost:9190", None)


def test_tuning_through_an_rpc_tracker_on_loopback(tmp_path):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    server = rpc.Server("127.0.0.1", port=9400, port_end=9600, key="pe-loopback",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        log = str(tmp_path / "rpc")
        r = _cli("tune", "examples/mlp_digits/train.py", "--trials", "8", "-o", log,
                 "--rpc-tracker", f"127.0.0.1:{tracker.port}", "--rpc-key", "pe-loopback")
        assert r.returncode == 0, r.stderr[-2000:]
        assert re.search(r"^8 trials run", r.stdout, re.M), r.stdout
    finally:
        server.terminate()
        tracker.terminate()
    with open(os.path.join(log, database.RECORD_FILE)) as f:
        measured = [json.loads(line) for line in f if line.strip()]
    assert len(measured) >= 4 and all(float(t) > 0 for r in measured for t in r[1][1])


def test_bench_compares_untuned_tuned_and_switched_with_pytorch(mlp_log):
    _, log, _ = mlp_log
    r = _cli("bench", "examples/mlp_digits/train.py", "--repeats", "2", "--tuning-log", log)
    assert r.returncode == 0, r.stderr[-2000:]
    header, _, times, ratios, summary = r.stdout.splitlines()[:5]
    assert header.split()[:6] == ["workload", "scheme", "untuned", "tuned", "tuned+switch", "eager"]
    assert times.count(" ms") == 4 and ratios.count("x") == 4  # three of ours and eager, each with a ratio
    assert "GFLOP/s" in summary and "speed-up over eager" in summary


def test_pytorch_is_timed_in_fresh_processes_under_both_openmp_wait_policies(monkeypatch):
    """PASSIVE waiting is ours (see pockengine/__init__): PyTorch is timed in fresh processes with
    and without it and credited with the faster; those processes build the job from its source."""
    from pockengine import bench

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in bench.peer_environment()
    assert bench.peer_environment("PASSIVE")["OMP_WAIT_POLICY"] == "PASSIVE"
    source = bench.JobSource(os.path.join(ROOT, "examples", "mlp_digits", "train.py"))
    times = bench.torch_times_in_fresh_processes(source, ["eager"], 2)
    assert times["eager"] > 0 and times["eager wait policy"] in ("default", "PASSIVE")
    assert times["peer wait policies"] == "default and PASSIVE"


def test_shipped_logs_tune_the_benchmark_transformer():
    """tuning_logs/host/transformer was tuned for benchmarks/step_time.py's transformer (full update):
    building that workload applies a tuned schedule to every kernel the tuner selected."""
    from conftest import FAST_HOST, load_example_module

    step_time = load_example_module("benchmarks/step_time.py", "step_time")
    workload = next(w for w in step_time.workloads() if w["name"] == "transformer")
    logs = database.log_directories(os.path.join(ROOT, "tuning_logs", "host"))
    assert os.path.join(ROOT, "tuning_logs", "host", "transformer") in logs
    job = step_time.make_job(workload, "full")
    program = pe.compile(job, FAST_HOST, tuning_logs=logs)
    report = database.TuningReport.from_json(program.meta["tuning"])
    assert len(report.tuned) >= 14 and report.fallback == [], report.summary()
    assert any(name.startswith("matmul") for name in report.tuned)
    assert 0 < program.step(workload["x"], workload["y"]) < 10
