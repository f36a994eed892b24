"""Artifacts never cost a user's files: refused destinations, a swap that survives a crash at any
instant, one writer at a time, nothing left behind by killed writers, permissions from the umask."""

import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import pockengine as pe
from conftest import MLP, ROOT, make_batches, snapshot
from pockengine.errors import ArtifactError
from pockengine.targets import device_runner
from pockengine.targets.device_runner import locked

BATCHES = make_batches((8, 32), 10, 4)
CLI = os.path.join(os.path.dirname(sys.executable), "pockengine")
TRAIN_PY = os.path.join(ROOT, "examples", "mlp_digits", "train.py")


@pytest.fixture(scope="module")
def program():
    job = pe.TrainingJob(MLP(), (BATCHES[0][0],), BATCHES[0][1], "cross_entropy", pe.optim.Adam(lr=1e-2))
    return pe.compile(job, target={"kind": "llvm", "opt-level": 0})


def user_files(tmp_path):
    home = tmp_path / "work"
    (home / "data").mkdir(parents=True)
    (home / "notes.txt").write_text("my notes")
    (home / "data" / "batches.npz").write_bytes(b"precious")
    return home


def test_export_refuses_what_is_not_an_artifact_and_force_replaces_it(program, tmp_path, monkeypatch):
    home = user_files(tmp_path)
    before = snapshot(home)
    with pytest.raises(ArtifactError, match="not a PockEngine artifact.*--force"):
        program.export(str(home))
    with pytest.raises(ArtifactError, match="not a directory.*--force"):
        program.export(str(home / "notes.txt"))
    monkeypatch.chdir(home / "data")
    for inside in (".", str(home)):  # the working directory, or a directory holding it: even with force
        with pytest.raises(ArtifactError, match="current directory"):
            program.export(inside, force=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(home / "data"))
    with pytest.raises(ArtifactError, match="home directory"):
        program.export(str(home), force=True)
    assert snapshot(home) == before and not [n for n in os.listdir(tmp_path) if n.startswith(".")]

    (tmp_path / "empty").mkdir()
    for ok in ("empty", "new/deeper"):  # an empty directory or a new path: written
        program.export(ok)
        assert pe.load(ok).signature == program.signature
    program.export("empty")  # an artifact: replaced
    program.export(str(home / "notes.txt"), force=True)
    assert pe.load(str(home / "notes.txt")).signature == program.signature


def test_cli_build_into_the_working_directory_is_refused_before_compiling(tmp_path):
    home = user_files(tmp_path)
    (home / "train.py").write_text(open(TRAIN_PY).read())
    before = snapshot(home)
    for args in (["-o", "."], ["-o", ".", "--force"], ["-o", "notes.txt"], ["-o", "data"]):
        result = subprocess.run([CLI, "build", "train.py", *args], cwd=home, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
        assert "Traceback" not in result.stderr and "import" not in result.stderr  # refused before compiling
    assert snapshot(home) == before


# Everything export does to the file system, as audit events: a crash is injected before each one.
MUTATIONS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree",
             "ctypes.call_function"}


def _export_crashing_at(program, path, crash_at: int, exchange: bool) -> int:
    """Fork; the child exports to `path` and dies (os._exit, as under SIGKILL) just before its
    `crash_at`-th file-system mutation. The child's exit status: 0 if it got through."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handler of any kind may run
        try:
            count = [0]

            def die_before(event, args):
                writing = event != "open" or (args[1] is not None and any(c in str(args[1]) for c in "wax+")) \
                    or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                if event in MUTATIONS and writing:
                    count[0] += 1
                    if count[0] == crash_at:
                        os._exit(137)

            if not exchange:  # a file system without RENAME_EXCHANGE: the two-rename fallback
                import pockengine.artifact_files as files

                files.exchange = lambda a, b: False
            sys.addaudithook(die_before)
            program.export(path)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the child's exit status is the result
            os._exit(1)
    return os.waitpid(pid, 0)[1] >> 8


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_crash_at_any_point_of_an_export_leaves_the_old_or_the_new_artifact(program, tmp_path, exchange):
    path, kept = str(tmp_path / "dest" / "art"), str(tmp_path / "old")
    program.export(path)
    shutil.copytree(path, kept)
    old_state = pe.load(path).state_dict()
    program.step(*BATCHES[1])  # the new version differs in its state
    new_state = program.state_dict()
    outcomes = []
    for crash_at in range(1, 100):
        status = _export_crashing_at(program, path, crash_at, exchange)
        assert status in (0, 137), f"the export failed (status {status}) instead of crashing"
        state = pe.load(path).state_dict()  # checks every file; repairs a half-done two-rename swap
        assert sorted(os.listdir(path)) == sorted(os.listdir(kept))
        new = all(np.array_equal(state[k], new_state[k]) for k in state)
        assert new or all(np.array_equal(state[k], old_state[k]) for k in state), \
            f"a crash before mutation {crash_at} left neither the old nor the new artifact"
        outcomes.append("new" if new else "old")
        if status == 0:
            break
        if new:  # back to the old artifact for the next crash point
            shutil.rmtree(path)
            shutil.copytree(kept, path)
    assert status == 0 and outcomes.count("old") > 5 and outcomes[-1] == "new", outcomes
    program.export(path)  # the next writer removes what the killed ones left
    assert os.listdir(tmp_path / "dest") == ["art"]


def test_killed_state_writers_leave_nothing_behind(program, tmp_path):
    path = str(tmp_path / "art")
    program.export(path)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    litter = [os.path.join(path, f".state-{dead.pid}-x1.npz"), str(tmp_path / f".art.tmp-{dead.pid}-x2")]
    open(litter[0], "wb").write(b"\0" * 1000)
    os.mkdir(litter[1])
    program.save_state(path)
    program.export(path)
    assert sorted(os.listdir(tmp_path)) == ["art"] and not [n for n in os.listdir(path) if n.startswith(".")]


def test_artifacts_are_readable_as_the_umask_says(program, tmp_path):
    old = os.umask(0o022)
    try:
        path = program.export(str(tmp_path / "art"))
        program.save_state(path)
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(root, n), tmp_path): stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)
             for root, dirs, files in os.walk(tmp_path) for n in dirs + files}
    assert modes == {"art": 0o755, **{f"art/{n}": 0o644 for n in os.listdir(path)}}


def test_concurrent_run_save_counts_every_step(program, tmp_path):
    """Two `run --save` at once: the second waits for the first, so 2+2 steps are all kept."""
    path = program.export(str(tmp_path / "art"))
    step_before = int(pe.load(path).optimizer_state_dict()["step"])
    with locked(path):  # both start while the artifact is busy
        runs = [subprocess.Popen([CLI, "run", path, "--steps", "2", "--save"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.monotonic() + 120
        waiting = [False, False]
        while not all(waiting) and time.monotonic() < deadline:
            for i, run in enumerate(runs):
                waiting[i] = waiting[i] or "waiting for another process" in (run.stderr.readline() or "")
        assert all(waiting)
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and "saved" in out, err
    assert int(pe.load(path).optimizer_state_dict()["step"]) == step_before + 4


def test_the_device_runner_resumes_from_its_saved_state(program, tmp_path):
    """What aarch64 and CUDA artifacts run (run_step.py): 2 steps saved and 3 more are 5 steps."""
    path = program.export(str(tmp_path / "art"))
    shutil.copytree(path, str(tmp_path / "straight"))
    quiet = open(os.devnull, "w")
    straight = device_runner.run(str(tmp_path / "straight"), 5, out=quiet)
    resumed = device_runner.run(path, 2, save=True, out=quiet) + device_runner.run(path, 3, save=True, out=quiet)
    assert resumed == straight
    with np.load(os.path.join(path, "state.npz")) as state:
        assert int(state["step"]) == int(pe.load(str(tmp_path / "straight")).optimizer_state_dict()["step"]) + 5


def test_a_saved_scheme_replaces_the_file_whole_and_clears_what_a_killed_writer_left(tmp_path):
    """SparseUpdate.save (and the search's JSON and plot) write beside the user's files: the new file
    or the old one, a dead writer's temporary file removed, the user's own files left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    litter = tmp_path / f".pockengine-write-{dead.pid}-x1"
    litter.write_bytes(b"\0" * 100)
    mine = tmp_path / ".tmp-1-notes"  # a user's file with a temporary-looking name
    mine.write_text("keep")
    path = str(tmp_path / "scheme.json")
    pe.SparseUpdate.bias_only().save(path)
    pe.SparseUpdate.last_k(2).save(path)
    assert pe.SparseUpdate.load(path).to_json() == pe.SparseUpdate.last_k(2).to_json()
    assert sorted(os.listdir(tmp_path)) == [".tmp-1-notes", "scheme.json"] and mine.read_text() == "keep"
