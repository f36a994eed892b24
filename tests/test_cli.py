"""The `pockengine` command line, run as a user would: the installed console script in a subprocess."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

EXAMPLE = os.path.join(ROOT, "examples", "mlp_digits", "train.py")


def pockengine(*args, cwd=None, env=None):
    script = os.path.join(os.path.dirname(sys.executable), "pockengine")
    assert os.path.exists(script), "the pockengine console script is not installed"
    return subprocess.run([script, *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "mlp_digits")
    result = pockengine("build", EXAMPLE, "--target", "host", "-o", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_build_shows_stages_and_writes_an_artifact(built):
    out, result = built
    for i, stage in enumerate(["import", "autodiff", "lower", "memory plan", "codegen"], 1):
        assert f"[{i}/5] {stage} ..." in result.stderr
    assert "planned peak memory" in result.stdout
    assert sorted(os.listdir(out)) == ["example.npz", "manifest.json", "state.npz", "train_step.so"]


def test_run_prints_loss_per_step_and_time(built):
    out, _ = built
    result = pockengine("run", out, "--steps", "3")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3 and all("loss" in line and "ms" in line for line in lines)
    losses = [float(line.split()[3]) for line in lines]
    assert losses[2] < losses[0]  # same example batch every step: the loss must fall
    assert "median" in result.stdout


def test_run_and_inspect_leave_pytorch_unloaded(built):
    """An artifact of TVM's kernels needs no PyTorch, but importing TVM loads it when it is installed:
    half of the commands' start-up. (An artifact calling PyTorch's kernels loads it:
    tests/passes/test_switch_backend.py runs one.)"""
    out, _ = built
    for args in (("run", out, "--steps", "1"), ("inspect", out)):
        result = pockengine(*args, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 0, result.stderr
        # "import time: self | cumulative | module" (microseconds) per import, attempted ones too
        cumulative = {}
        for line in result.stderr.splitlines():
            if line.startswith("import time:") and line.split("|")[1].strip().isdigit():
                name = line.rsplit("|", 1)[-1].strip()
                cumulative[name] = max(cumulative.get(name, 0), int(line.split("|")[1]))
        assert cumulative.get("tvm.runtime", 0) > 0, args
        loaded_torch = {name: us for name, us in cumulative.items() if name.split(".")[0] == "torch" and us > 1000}
        assert not loaded_torch, (args, loaded_torch)  # a refused import takes microseconds


def test_run_with_data_file_and_save(built, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(built[0], out)
    example = np.load(os.path.join(out, "example.npz"))
    data = str(tmp_path / "batches.npz")
    np.savez(data, x=np.stack([example["x"], example["x"][::-1]]),
             target=np.stack([example["target"], example["target"][::-1]]))
    before = np.load(os.path.join(out, "state.npz"))["0.weight"]
    result = pockengine("run", out, "--steps", "4", "--data", data, "--save")
    assert result.returncode == 0, result.stderr
    assert "saved the trained state" in result.stdout
    assert not np.array_equal(np.load(os.path.join(out, "state.npz"))["0.weight"], before)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, images=example["x"])
    result = pockengine("run", out, "--data", bad)
    assert result.returncode == 2 and "lacks arrays ['x', 'target']" in result.stderr


def test_inspect_shows_manifest_and_memory_table(built):
    out, _ = built
    result = pockengine("inspect", out)
    assert result.returncode == 0, result.stderr
    assert "inputs     x (32, 64) float32, target (32,) int64" in result.stdout
    assert "optimizer  SGD(lr=0.05, momentum=0.9" in result.stdout
    assert "planned peak" in result.stdout and "saved act" in result.stdout
    manifest = json.loads(pockengine("inspect", out, "--json").stdout)
    assert manifest["name"] == "mlp_digits"


def test_inspect_plots_the_memory_timeline(built, tmp_path):
    png = str(tmp_path / "memory.png")
    result = pockengine("inspect", built[0], "--plot", png)
    assert result.returncode == 0, result.stderr
    assert f"wrote {png}" in result.stdout
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_targets_lists_presets():
    """Every preset, its family, whether this machine can build for it and run it (what is missing
    and the packages), its TVM target as JSON; then the aliases."""
    from pockengine.targets import ALIASES, presets

    result = pockengine("targets")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, preset in presets().items():
        at = next(i for i, line in enumerate(lines) if line.split()[:2] == [name, preset.family])
        status, tvm_target = lines[at + 1], lines[at + 2]
        missing = preset.missing_tools("build")
        assert ("build: ready" in status) == (not missing), status
        assert all(tool.program in status for tool in missing) and status.endswith(f"runs on {preset.runner}")
        assert json.loads(tvm_target) == preset.tvm_target
        assert "run: " in status
    assert lines[0].startswith("host") and all(f"{alias} = {name}" in lines[-2] for alias, name in ALIASES.items())


def test_output_into_a_pipe_whose_reader_stopped_ends_quietly():
    """`pockengine targets | head -1`: once the reader is gone the command stops without an error
    message, with the status a shell expects for it (128 + SIGPIPE)."""
    script = os.path.join(os.path.dirname(sys.executable), "pockengine")
    listing = subprocess.Popen([script, "targets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listing.stdout.close()  # the reader leaves before the first line
    stderr = listing.stderr.read()
    assert listing.wait() == 141 and stderr == ""


def test_train_py_without_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import torch\nmodel = torch.nn.Linear(2, 2)\n")
    result = pockengine("build", str(script))
    assert result.returncode == 2
    assert "defines no `job`" in result.stderr and "Traceback" not in result.stderr


def test_unknown_target(tmp_path):
    result = pockengine("build", EXAMPLE, "--target", "jetson-nano-9000", "-o", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "unknown target 'jetson-nano-9000'" in result.stderr and "host" in result.stderr
    result = pockengine("build", EXAMPLE, "--target", '{"kind": "vulkan"}', "-o", str(tmp_path / "x"))
    assert result.returncode == 2 and "is not one PockEngine builds for" in result.stderr


def test_corrupt_artifact(built, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(built[0], out)
    with open(os.path.join(out, "state.npz"), "wb") as f:
        f.write(b"PK\x03\x04 not really")
    result = pockengine("run", out)
    assert result.returncode == 2
    assert "state.npz is corrupt or truncated" in result.stderr and "Traceback" not in result.stderr
