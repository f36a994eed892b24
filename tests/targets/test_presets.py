"""Targets as data: presets, TVM tags and target dicts resolve to a family; what a target needs and
lacks on this machine is an error naming the Debian package, for building and for running."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import tvm

from conftest import ROOT
from pockengine import targets
from pockengine.errors import TargetError

EXAMPLE = os.path.join(ROOT, "examples", "mlp_digits", "train.py")
CLI = os.path.join(os.path.dirname(sys.executable), "pockengine")


def test_presets_are_valid_tvm_targets_of_their_family():
    presets = targets.presets()
    assert {"host", "jetson-orin", "jetson-orin-nano", "rpi4", "cortex-m4", "cortex-m7", "cortex-m55"} <= set(presets)
    for _name, preset in presets.items():
        target = preset.target()  # TVM accepts the dict
        assert target.kind.name == {"host": "llvm", "aarch64": "llvm", "cuda": "cuda", "cortex-m": "c"}[preset.family]
        if preset.family == targets.CORTEX_M:
            assert preset.sram_bytes and preset.flash_bytes and preset.board["qemu_machine"].startswith("mps")
        if preset.family == targets.CUDA:
            assert str(target.attrs["arch"]).startswith("sm_") and target.host is not None
    assert str(presets["jetson-orin"].target().attrs["arch"]) == "sm_87"
    assert targets.resolve("jetson") is presets["jetson-orin"]
    assert str(presets["rpi4"].target().attrs["mcpu"]) == "cortex-a72"


@pytest.mark.parametrize("spec, family", [
    ("nvidia/jetson-agx-orin-64gb", targets.CUDA),
    ("raspberry-pi/4b-aarch64", targets.AARCH64),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}, targets.AARCH64),
    ({"kind": "cuda", "arch": "sm_72"}, targets.CUDA),
    ({"kind": "c", "mcpu": "cortex-m7"}, targets.CORTEX_M),
    ({"kind": "llvm", "num-cores": 2}, targets.HOST),
])
def test_tags_and_dicts_resolve_to_a_family(spec, family):
    preset = targets.resolve(spec)
    assert preset.family == family
    if family == targets.CORTEX_M:  # the board and limits of the matching preset come along
        assert preset.sram_bytes == targets.presets()["cortex-m7"].sram_bytes


def test_targets_nothing_builds_for_are_errors_that_say_what_would():
    with pytest.raises(TargetError, match="unknown target 'jetson-xavier-9000': use a preset"):
        targets.resolve("jetson-xavier-9000")
    with pytest.raises(TargetError, match="through TVM's C code generator"):
        targets.resolve({"kind": "llvm", "mtriple": "thumbv7em-none-eabihf", "mcpu": "cortex-m4"})
    with pytest.raises(TargetError, match="is not one PockEngine builds for"):
        targets.resolve(tvm.target.Target({"kind": "vulkan"}))


def bare_path(tmp_path, *programs) -> dict:
    """The environment with a PATH holding python and `programs` only: no compilers, no emulators."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, path in [("python", sys.executable)] + [(p, shutil.which(p)) for p in programs]:
        os.symlink(path, bin_dir / name)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize("target, program, package", [
    ("rpi4", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
    ("jetson", "nvcc", "nvidia-cuda-toolkit"),  # and its aarch64 host code: g++-aarch64-linux-gnu
    ("cortex-m4", "arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),
])
def test_a_missing_toolchain_names_the_package_to_install(tmp_path, target, program, package):
    env = bare_path(tmp_path)
    built = subprocess.run([CLI, "build", EXAMPLE, "--target", target, "-o", str(tmp_path / "out")],
                           capture_output=True, text=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert built.returncode == 2 and "Traceback" not in built.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in built.stderr.splitlines()
                if line.startswith("import time:")]
    assert "pockengine.cli" in imported and not {"tvm", "torch"} & set(imported)  # refused at once, not in seconds
    missing, install = re.search(r"target \S+: (.+) not found, needed to build for it; install it with "
                                 r"`apt-get install ([^`]+)`", built.stderr).groups()
    assert program in missing.split(", ") and set(package.split()) <= set(install.split())
    listed = subprocess.run([CLI, "targets"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and f"missing {program}" in listed.stdout


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")
def test_running_without_the_emulator_names_its_package(tmp_path):
    out = str(tmp_path / "m4")
    built = subprocess.run([CLI, "build", EXAMPLE, "--target", "cortex-m4", "-q", "-o", out], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    env = bare_path(tmp_path, "make")  # make, but no qemu-system-arm
    ran = subprocess.run([CLI, "run", out, "--steps", "1"], capture_output=True, text=True, env=env)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ("qemu-system-arm not found, needed to run for it; "
            "install it with `apt-get install qemu-system-arm`" in ran.stderr)
