"""The step's thread pool on a shared machine: as many workers as CPUs the process may use, none
pinned, the user's environment and affinity left as they were; `threads=N` and `--threads N`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pockengine as pe
from conftest import MLP, ROOT, make_batches
from pockengine.errors import InputError
from pockengine.targets.device_runner import ThreadGovernor, available_cpus, cgroup_cpu_quota

BATCHES = make_batches((8, 32), 10, 2)
TVM_VARIABLES = ("TVM_NUM_THREADS", "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_NUM_THREADS")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    job = pe.TrainingJob(MLP(), (BATCHES[0][0],), BATCHES[0][1], "cross_entropy", pe.optim.SGD(lr=0.1))
    path = str(tmp_path_factory.mktemp("threads") / "mlp")
    pe.compile(job).export(path)
    return path


# Loads the artifact in a fresh process (TVM's pool settings are per process), restricted to the
# CPUs given, runs a step and reports what the pool and the process look like afterwards.
PROBE = textwrap.dedent("""
    import glob, json, os, sys
    cpus, threads = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    if cpus:
        os.sched_setaffinity(0, cpus)
    environment = {k: os.environ.get(k) for k in %r}
    affinity = sorted(os.sched_getaffinity(0))
    import numpy as np, pockengine as pe, tvm
    program = pe.load(sys.argv[1], threads=threads)
    program.step(*[np.asarray(a) for a in program.example.values()])
    tids = [int(t.rsplit("/", 1)[1]) for t in glob.glob(f"/proc/{os.getpid()}/task/*")]
    print(json.dumps({
        "threads": program.threads,
        "counts": list(program._governor.counts),
        "workers": tvm.get_global_func("runtime.NumThreads")(),
        "environment_kept": environment == {k: os.environ.get(k) for k in environment},
        "affinity_kept": sorted(os.sched_getaffinity(0)) == affinity,
        "pinned": [t for t in tids if sorted(os.sched_getaffinity(t)) != affinity],
    }))
""" % (TVM_VARIABLES,))  # noqa: UP031 - str.format would need every brace of the script doubled


def probe(artifact, cpus=None, threads=None, **environment):
    env = {**{k: v for k, v in os.environ.items() if k not in TVM_VARIABLES}, **environment}
    done = subprocess.run([sys.executable, "-c", PROBE, artifact, json.dumps(cpus), json.dumps(threads)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_available_cpu_means_one_worker(artifact):
    result = probe(artifact, cpus=[sorted(os.sched_getaffinity(0))[0]])
    assert result["counts"] == [1] and result["workers"] == 1
    assert result["environment_kept"] and result["affinity_kept"] and result["pinned"] == []


def test_the_pool_follows_the_available_cpus_and_pins_nothing(artifact):
    result = probe(artifact)
    counts = [available_cpus(), available_cpus() // 2] if available_cpus() > 1 else [1]
    assert result["counts"] == counts and result["workers"] in counts
    # TVM's default pins each worker to a core and the calling thread to the first ones: a worker
    # whose core another process keeps busy could not move
    assert result["environment_kept"] and result["affinity_kept"] and result["pinned"] == []


def test_threads_set_explicitly(artifact):
    result = probe(artifact, threads=1)
    assert result["threads"] == 1 and result["workers"] == 1 and result["environment_kept"]
    # TVM's own variable, set by the user, is the same choice
    result = probe(artifact, TVM_NUM_THREADS="1")
    assert result["threads"] == 1 and result["workers"] == 1 and result["environment_kept"]


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_a_thread_count_that_is_not_a_whole_number_above_zero_is_refused(artifact, value):
    with pytest.raises(InputError, match="threads must be a whole number >= 1"):
        pe.load(artifact, threads=value)


def test_loading_and_stepping_leave_this_process_environment_alone(artifact):
    before = {k: os.environ.get(k) for k in TVM_VARIABLES}
    program = pe.load(artifact, threads=2)
    program.step(*BATCHES[0])
    program.threads = 1
    program.step(*BATCHES[1])
    assert {k: os.environ.get(k) for k in TVM_VARIABLES} == before


def test_the_command_line_takes_threads(artifact, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "pockengine")
    done = subprocess.run([script, "run", artifact, "--steps", "2", "--threads", "1"], capture_output=True, text=True)
    assert done.returncode == 0 and "2 steps" in done.stdout, done.stderr
    done = subprocess.run([script, "run", artifact, "--threads", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--threads" in done.stderr and "Traceback" not in done.stderr


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_cgroup_cpu_quotas_are_read_from_v2_and_v1_hierarchies(tmp_path):
    root, proc = str(tmp_path / "cgroup"), str(tmp_path / "proc_cgroup")
    # v2: the process's cgroup has no limit, its parent 1.5 CPUs, the root none
    write(proc, "0::/machine/app\n")
    write(f"{root}/machine/app/cpu.max", "max 100000\n")
    write(f"{root}/machine/cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert available_cpus(proc, root) == 1  # 1.5 CPUs: one worker, not two throttled ones
    write(f"{root}/machine/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(proc, root) is None
    # v1: the cpu controller's own hierarchy, -1 for no quota
    root1 = str(tmp_path / "cgroup1")
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(f"{root1}/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n")
    write(f"{root1}/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, root1) == 3.0
    write(f"{root1}/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(proc, root1) is None
    # no cgroup file at all (another OS): no quota
    assert cgroup_cpu_quota(str(tmp_path / "absent"), root) is None
    assert available_cpus(str(tmp_path / "absent"), root) == len(os.sched_getaffinity(0))


def run_governor(governor, step_time, steps):
    """Steps whose time is step_time(workers); the worker counts the governor chose."""
    chosen = []
    for _ in range(steps):
        workers = governor.threads()
        governor.record(workers, step_time(workers))
        chosen.append(workers)
    return chosen


def test_the_governor_keeps_all_cpus_on_a_quiet_machine_and_half_beside_busy_processes():
    """Measured on MobileNetV2-0.35 (2 cores): 52 ms on 2 workers and 97 ms on 1 when quiet; beside
    a busy process 190-700 ms on 2 workers and ~100 ms on 1."""
    governor = ThreadGovernor(2)
    quiet = {2: 0.052, 1: 0.097}
    chosen = run_governor(governor, quiet.__getitem__, 400)
    assert chosen[-300:].count(1) <= 3  # a trial of one worker at most every MAX_INTERVAL steps
    busy = {2: 0.4, 1: 0.1}
    chosen = run_governor(governor, busy.__getitem__, 200)
    assert chosen[1] == 1 and chosen[-150:].count(2) <= 3  # the first slow step is followed by a trial
    chosen = run_governor(governor, quiet.__getitem__, ThreadGovernor.MAX_INTERVAL + 10)
    assert chosen[-5:] == [2] * 5  # back to all CPUs by the next trial
    assert ThreadGovernor(1).counts == (1,) and run_governor(ThreadGovernor(1), quiet.__getitem__, 5) == [1] * 5
    assert ThreadGovernor(8).counts == (8, 4)


def test_pockengine_leaves_the_environment_alone():
    """Importing pockengine, compiling with library kernels and stepping set no environment variable
    (OMP_WAIT_POLICY included: without it, library kernels run on one PyTorch thread)."""
    script = textwrap.dedent("""
        import os
        before = dict(os.environ)
        import torch
        import pockengine as pe
        x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
        model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        program = pe.compile(pe.TrainingJob(model, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1)), backend="library")
        assert program.meta["backend"]["library_kernels"]
        program.step(x, y)
        changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
        assert not changed, changed
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
