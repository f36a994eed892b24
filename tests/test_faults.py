"""The command line under bad input and failing disks, run as a user would (subprocesses): every case
exits 2 with one `error:` line naming the file and the fix, no traceback, and no byte of the user's
files changed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import snapshot

CLI = os.path.join(os.path.dirname(sys.executable), "pockengine")


def refused(*args, cwd=None) -> str:
    """Run the CLI; assert it failed as promised; its error line."""
    result = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and len([line for line in lines if line.startswith("error:")]) == 1, \
        result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    program = pe.compile(pe.TrainingJob(nn.Sequential(nn.Linear(8, 3)), (x,), y, "cross_entropy",
                                        pe.optim.SGD(lr=0.1)), {"kind": "llvm", "opt-level": 0})
    return program.export(str(tmp_path_factory.mktemp("faults") / "art"))


@pytest.fixture
def copy(artifact, tmp_path):
    path = str(tmp_path / "art")
    shutil.copytree(artifact, path)
    return path


# Each key missing once, each command seeing two of them: both commands check the manifest in
# read_manifest, and every key with both commands was 8 CLI processes of ~5 s.
@pytest.mark.parametrize("key, command", [("signature", "run"), ("files", "inspect"), ("memory", "inspect"),
                                          ("name", "run")])
def test_a_manifest_missing_a_key_is_named(copy, key, command):
    manifest_path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(manifest_path))
    del manifest[key]
    json.dump(manifest, open(manifest_path, "w"))
    before = snapshot(copy)
    assert f"lacks {key}" in refused(command, copy, *(["--steps", "1"] if command == "run" else []))
    assert snapshot(copy) == before


def test_inspect_of_an_incomplete_artifact_says_so(copy):
    os.remove(os.path.join(copy, "train_step.so"))
    assert "incomplete: train_step.so missing" in refused("inspect", copy)


def test_an_npy_or_a_corrupt_file_as_data_is_named(copy, tmp_path):
    np.save(tmp_path / "batch.npy", np.zeros((4, 8), "float32"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    before = snapshot(copy)
    assert "np.savez" in refused("run", copy, "--data", str(tmp_path / "batch.npy"))
    assert "not readable as .npz" in refused("run", copy, "--data", str(tmp_path / "garbage.npz"))
    assert snapshot(copy) == before


def test_batch_counts_that_disagree_are_an_error(copy, tmp_path):
    data = str(tmp_path / "data.npz")
    np.savez(data, x=np.zeros((5, 4, 8), "float32"), target=np.zeros((3, 4), "int64"))
    assert "different numbers of batches" in refused("run", copy, "--data", data)


@pytest.mark.parametrize("steps", ["0", "-1", "two"])
def test_steps_below_one_are_an_error(copy, steps):
    result = subprocess.run([CLI, "run", copy, "--steps", steps], capture_output=True, text=True)
    assert result.returncode == 2 and "--steps" in result.stderr and "Traceback" not in result.stderr


def test_a_truncated_library_without_a_checksum_is_refused_before_loading(copy):
    """Without the check, dlopen maps the truncated file and the process dies of SIGBUS."""
    manifest_path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(manifest_path))
    del manifest["sha256"]
    json.dump(manifest, open(manifest_path, "w"))
    library = os.path.join(copy, "train_step.so")
    with open(library, "r+b") as f:
        f.truncate(os.path.getsize(library) // 2)
    assert "truncated" in refused("run", copy, "--steps", "1")


TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mlp_digits",
                        "train.py")


def test_a_binary_tuning_log_is_named(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "database_workload.json").write_bytes(bytes(range(256)))
    (logs / "database_tuning_record.json").write_bytes(b"")
    line = refused("build", TRAIN_PY, "--tuning-log", str(logs), "-o", str(tmp_path / "out"))
    assert "database_workload.json is not a text file" in line and not (tmp_path / "out").exists()


def test_an_unknown_cpu_is_refused_not_built_generic(tmp_path):
    target = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a99"})
    line = refused("build", TRAIN_PY, "--target", target, "-o", str(tmp_path / "out"))
    assert "does not know the CPU mcpu='cortex-a99'" in line and not (tmp_path / "out").exists()


def as_a_user() -> list:
    """A command prefix under which file permissions apply as they do to a user: for root, its
    override of them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped with util-linux's setpriv."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop root's override of permissions")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_a_directory_without_write_permission_is_named_before_any_work(copy, tmp_path):
    """EACCES: one line naming the directory and the fix, before any work (stderr is that line alone:
    the build printed no stage, the run no step), and no byte changed."""
    user = as_a_user()
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "notes.txt").write_text("mine")
    os.chmod(copy, 0o555)
    os.chmod(locked, 0o555)
    try:
        before = snapshot(copy)
        result = subprocess.run([*user, CLI, "run", copy, "--steps", "1", "--save"], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"error: {copy}: permission denied: fix its permissions, or use another " \
                                        "path (a copy of the artifact)"
        assert "step" not in result.stdout and snapshot(copy) == before
        assert "loss" in subprocess.run([*user, CLI, "run", copy, "--steps", "1"], capture_output=True,
                                        text=True).stdout

        result = subprocess.run([*user, CLI, "build", TRAIN_PY, "-o", str(locked / "new" / "art")],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == (f"error: {locked}: permission denied: fix its permissions, or use another "
                                         "path (-o)")
        assert sorted(os.listdir(locked)) == ["notes.txt"] and (locked / "notes.txt").read_text() == "mine"
    finally:  # pytest removes tmp_path afterwards, which a user other than root could not
        os.chmod(copy, 0o755)
        os.chmod(locked, 0o755)


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (disk / "notes.txt").write_text("my notes")
        before = snapshot(disk)
        line = refused("build", TRAIN_PY, "-o", str(disk / "art"))
        assert "the disk is full" in line
        assert snapshot(disk) == before and sorted(os.listdir(disk)) == ["notes.txt"]
    finally:
        subprocess.run(["umount", str(disk)])
