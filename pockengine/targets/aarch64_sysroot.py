"""An aarch64 Python with numpy and the TVM runtime, run on this machine under `qemu-aarch64`.

Why: a step compiled for an ARM board (Raspberry Pi, Jetson CPU) is an aarch64 shared library. To
check its results without the board we run it where it would run — in an aarch64 Python loading the
aarch64 TVM runtime — with QEMU's user-mode emulation translating the instructions.

What: Debian bookworm's arm64 python3.11 and the shared libraries it needs, unpacked into a sysroot
(`qemu-aarch64 -L <root>` resolves the program interpreter and every library there), plus the
aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy and their runtime dependencies in a
site-packages directory beside it. The system's apt configuration is left untouched: the .debs are
fetched with urllib from the Debian mirror apt already uses and checked against the signed index.

    sysroot = ensure_sysroot()                  # downloads ~130 MB once, then instant
    subprocess.run(sysroot.command(["run.py"]), env=sysroot.environment(), check=True)

`python -m pockengine.targets.aarch64_sysroot` fetches and prints the sysroot's directory.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir
from ..errors import TargetError, ToolchainError

TVM_VERSION = "0.27.0.post1"
# Newer tvm-ffi releases segfault in tvm.ir.save_json (writing MetaSchedule databases); tvm itself
# only asks >=0.1.14.post0.
TVM_FFI_VERSION = "0.1.14.post1"
PYTHON_VERSION = "3.11"  # bookworm's python3, and the ABI the cp311 wheels are built for
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Roots of the Debian dependency closure: the interpreter with its full standard library, and the
# C++ runtime libtvm_runtime / libtvm_ffi link against (libc6 etc. follow through Depends).
DEBIAN_SEEDS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1")
# Reached through Depends but not needed to run programs: package management and its tools
# (readline-common -> dpkg -> tar ...), configuration and data packages.
DEBIAN_SKIP = frozenset({"dpkg", "tar", "install-info", "readline-common", "debconf", "perl-base", "tzdata"})
# Unpacked files nothing run here reads: glibc's iconv modules (20 MB; Python has its own codecs), docs.
ROOT_SKIP = ("usr/lib/aarch64-linux-gnu/gconv", "usr/share/doc", "usr/share/man", "usr/share/lintian")
# Wheel members only a compiler, a C++ extension build or a package's own test suite needs.
# libtvm_compiler.so alone is 240 MB; without it `import tvm` loads the runtime only, all a device runs.
WHEEL_SKIP = re.compile(r"tvm/lib/libtvm_compiler\.so$|(tvm|tvm_ffi)/(3rdparty|include|src|web)/|numpy/(.+/)?tests/")
# Bump when the layout or contents change, so old caches are not reused.
FORMAT = 1

Progress = Callable[[str], None]


def _print_progress(message: str) -> None:
    print(f"[aarch64 sysroot] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sysroot:
    """A fetched aarch64 environment. `root` is the Debian sysroot passed to `qemu-aarch64 -L`;
    `python` the aarch64 interpreter inside it; `site_packages` holds the wheels."""

    root: Path
    python: Path
    site_packages: Path
    qemu: str

    def command(self, argv: list[str]) -> list[str]:
        """The command running `python3.11 argv...` under emulation. Paths in `argv` are host paths:
        QEMU looks a path up under `root` first and falls back to the host's file."""
        return [self.qemu, "-L", str(self.root), str(self.python), *argv]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) adjusted so the guest Python finds its own standard library and
        packages and nothing of the host's (x86 extension modules would fail to load)."""
        env = dict(os.environ if base is None else base)
        # Host settings the guest would otherwise inherit: the dynamic loader would try x86 libraries,
        # Python would mix in the venv's or the user's x86 site-packages.
        for name in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR",
                     "PYTHONUSERBASE", "VIRTUAL_ENV", "QEMU_LD_PREFIX"):
            env.pop(name, None)
        env.update({
            "PYTHONHOME": str(self.root / "usr"),
            "PYTHONPATH": str(self.site_packages),
            "PYTHONNOUSERSITE": "1",
            # Runtime only, stated rather than left to TVM's fallback when libtvm_compiler.so is not found
            # (it is not shipped here): compiler-only modules stay unimported, which with the compiler
            # library present is the difference between 26 s and 9.5 s under QEMU (measured here).
            "TVM_USE_RUNTIME_LIB": "1",
        })
        return env


def _pins() -> dict[str, str]:
    """Wheels to fetch: tvm and tvm-ffi at the versions this project supports, the rest at the host
    venv's versions so host and guest run the same numpy. These are `import tvm`'s runtime Requires-Dist."""
    pins = {"apache-tvm": TVM_VERSION, "apache-tvm-ffi": TVM_FFI_VERSION}
    for name in ("numpy", "ml_dtypes", "typing_extensions"):
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise TargetError(f"{name} is not installed in this Python environment; the aarch64 sysroot pins "
                              f"its version to the host's: pip install {name}") from None
    return pins


def _cache_name(pins: Mapping[str, str]) -> str:
    # Readable for the main versions, plus a digest of everything that defines the contents.
    digest = hashlib.sha256(json.dumps([FORMAT, SUITE, DEBIAN_SEEDS, sorted(DEBIAN_SKIP), ROOT_SKIP, WHEEL_SKIP.pattern,
                                        sorted(pins.items())]).encode()).hexdigest()[:8]
    return f"aarch64-py{PYTHON_VERSION}-tvm{pins['apache-tvm']}-numpy{pins['numpy']}-{digest}"


def find_qemu() -> str:
    """qemu-aarch64 (or Debian's -static build): checked before anything is downloaded, since without it
    the sysroot cannot run."""
    path = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if path is None:
        raise ToolchainError("qemu-aarch64 is not installed; it runs aarch64 programs on this machine: "
                          "apt-get install qemu-user")
    return path


def ensure_sysroot(progress: Progress | None = _print_progress) -> Sysroot:
    """The cached sysroot, fetched first if absent (`progress` gets one line per step; None silences it).
    Built in a temporary directory beside the cache entry and renamed into place at the end, so an
    interrupted fetch never leaves a half-built cache."""
    progress = progress or (lambda message: None)
    qemu = find_qemu()
    pins = _pins()
    cache = cache_dir()
    final = cache / _cache_name(pins)
    if not (final / "manifest.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(cache, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        try:
            started = time.monotonic()
            _build(tmp, final, qemu, pins, progress)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache entry is readable like any download
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same build first: keep its copy.
                if not (final / "manifest.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            progress(f"ready in {time.monotonic() - started:.0f} s: {final} ({_size(_tree_bytes(final))})")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _sysroot_at(final, qemu)


def _sysroot_at(directory: Path, qemu: str) -> Sysroot:
    root = directory / "root"
    return Sysroot(root=root, python=root / "usr" / "bin" / f"python{PYTHON_VERSION}",
                   site_packages=directory / "site-packages", qemu=qemu)


def _build(tmp: Path, final: Path, qemu: str, pins: Mapping[str, str], progress: Progress) -> None:
    if shutil.which("dpkg-deb") is None:
        raise ToolchainError("dpkg-deb is needed to unpack Debian packages: apt-get install dpkg")
    downloads = tmp / "downloads"
    downloads.mkdir()
    debs = _fetch_debian(downloads, tmp / "root", progress)
    wheels = _fetch_wheels(downloads, tmp / "site-packages", pins, progress)
    shutil.rmtree(downloads)
    sysroot = _sysroot_at(tmp, qemu)
    if not sysroot.python.is_file():
        raise TargetError(f"the Debian packages did not provide {sysroot.python.relative_to(tmp)}")
    _precompile(sysroot, tmp, final, progress)
    (tmp / "manifest.json").write_text(json.dumps({"debian": debs, "wheels": wheels}, indent=1) + "\n")


# ---------------------------------------------------------------- Debian packages


def debian_mirrors() -> list[str]:
    """The mirrors apt is configured with for bookworm's main suite (one-line .list and deb822 .sources
    files), then deb.debian.org: the mirror this machine can reach is most likely the one apt uses."""
    found = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        for line in _read_lines(path):
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                found.append(words[1])
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = "\n".join(line for line in _read_lines(path) if not line.lstrip().startswith("#"))
        for stanza in re.split(r"\n\s*\n", text):
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in stanza.splitlines()) if k.strip()}
            if ("deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split()
                    and fields.get("enabled", "yes").lower() != "no"):
                found.extend(fields.get("uris", "").split())
    mirrors = []
    for uri in [*found, DEFAULT_MIRROR]:
        uri = uri.rstrip("/")
        if uri.startswith(("http://", "https://")) and uri not in mirrors:
            mirrors.append(uri)
    return mirrors


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _fetch_debian(downloads: Path, root: Path, progress: Progress) -> list[dict]:
    errors = []
    for mirror in debian_mirrors():
        try:
            index = _packages_index(mirror, downloads, progress)
            break
        except TargetError as e:
            errors.append(str(e))
            progress(f"{e}; trying the next mirror")
    else:
        raise TargetError("no Debian mirror provided the arm64 package index: " + "; ".join(errors))
    packages = _dependency_closure(index)
    total = sum(int(p["Size"]) for p in packages)
    progress(f"{len(packages)} Debian arm64 packages, {_size(total)}: "
             + " ".join(p["Package"] for p in packages))
    root.mkdir()
    for p in packages:
        deb = downloads / Path(p["Filename"]).name
        _download(f"{mirror}/{p['Filename']}", deb, progress, sha256=p["SHA256"], size=int(p["Size"]))
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        deb.unlink()
    for unused in ROOT_SKIP:
        shutil.rmtree(root / unused, ignore_errors=True)
    _relativize_symlinks(root)
    return [{"package": p["Package"], "version": p["Version"], "sha256": p["SHA256"]} for p in packages]


def _packages_index(mirror: str, downloads: Path, progress: Progress) -> dict[str, dict]:
    """Package name -> its stanza in bookworm/main/binary-arm64/Packages, read only after the index's
    SHA256 matched the one in InRelease (whose signature gpgv checks against Debian's keyring)."""
    dists = f"{mirror}/dists/{SUITE}"
    in_release = downloads / "InRelease"
    _download(f"{dists}/InRelease", in_release, progress)
    release = _verified_release(in_release, progress)
    member = "main/binary-arm64/Packages.xz"
    match = re.search(rf"^ ([0-9a-f]{{64}})\s+(\d+)\s+{re.escape(member)}$", release.split("\nSHA256:", 1)[-1],
                      re.MULTILINE)
    if match is None:
        raise TargetError(f"{dists}/InRelease lists no {member}")
    packages_xz = downloads / "Packages.xz"
    _download(f"{dists}/{member}", packages_xz, progress, sha256=match.group(1), size=int(match.group(2)))
    index: dict[str, dict] = {}
    provides: dict[str, str] = {}
    for stanza in lzma.decompress(packages_xz.read_bytes()).decode("utf-8", "replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[:1] not in " \t")
        name = fields.get("Package")
        if name and name not in index:
            index[name] = fields
            for virtual in fields.get("Provides", "").split(","):
                provides.setdefault(virtual.strip().split(" ")[0], name)
    packages_xz.unlink()
    for virtual, real in provides.items():  # a Depends on a virtual package takes its first provider
        index.setdefault(virtual, index[real])
    return index


def _verified_release(in_release: Path, progress: Progress) -> str:
    gpgv = shutil.which("gpgv")
    if gpgv is None or not os.path.isfile(KEYRING):
        progress(f"gpgv or {KEYRING} missing: the index's signature is not checked, only its hashes")
        return in_release.read_text(errors="replace")
    verified = in_release.with_suffix(".verified")
    # --output writes only the signed text, so nothing outside the signature can be slipped in.
    _run([gpgv, "--quiet", "--keyring", KEYRING, "--output", str(verified), str(in_release)],
         f"checking the signature of {in_release.name}")
    return verified.read_text(errors="replace")


def _dependency_closure(index: Mapping[str, dict]) -> list[dict]:
    """DEBIAN_SEEDS and everything they Depend/Pre-Depend on, minus DEBIAN_SKIP. Of alternatives
    (a | b) the first one present is taken; version constraints are not checked (one suite, one version)."""
    chosen: dict[str, dict] = {}
    todo = list(DEBIAN_SEEDS)
    while todo:
        name = todo.pop()
        if name in DEBIAN_SKIP:
            continue
        if name not in index:
            raise TargetError(f"Debian {SUITE} arm64 has no package {name!r}")
        stanza = index[name]
        if stanza["Package"] in chosen:
            continue
        chosen[stanza["Package"]] = stanza
        for field in ("Pre-Depends", "Depends"):
            for clause in filter(None, (c.strip() for c in stanza.get(field, "").split(","))):
                names = [a.strip().split(" ")[0].split(":")[0] for a in clause.split("|")]
                todo.append(next((n for n in names if n in index or n in DEBIAN_SKIP), names[0]))
    return sorted(chosen.values(), key=lambda p: p["Package"])


def _relativize_symlinks(root: Path) -> None:
    """Debian's absolute symlinks (e.g. /lib/ld-linux-aarch64.so.1 -> /lib/aarch64-linux-gnu/...) would
    resolve against the host's /, where the aarch64 files are not; point them inside the sysroot."""
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            link = Path(directory) / name
            if link.is_symlink() and os.readlink(link).startswith("/"):
                target = root / os.readlink(link).lstrip("/")
                link.unlink()
                link.symlink_to(os.path.relpath(target, link.parent))


# ---------------------------------------------------------------- wheels


def _fetch_wheels(downloads: Path, site_packages: Path, pins: Mapping[str, str], progress: Progress) -> list[str]:
    """aarch64 cp311 wheels from the package index pip is configured with, unzipped without installing
    (the guest has no pip, and the host's pip cannot install for another platform)."""
    wheel_dir = downloads / "wheels"
    requirements = [f"{name}=={version}" for name, version in pins.items()]
    progress("pip download (aarch64, cp311): " + " ".join(requirements))
    # Not --quiet: on failure the captured output (connection errors name the index URL) goes in the error.
    command = [sys.executable, "-m", "pip", "download", "--progress-bar", "off", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir), "--python-version", PYTHON_VERSION,
               "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
               "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64", *requirements]
    index = os.environ.get("PIP_INDEX_URL", "pip's configured index, by default https://pypi.org/simple")
    _run(command, f"downloading the aarch64 wheels from {index}")
    names = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        progress(f"unpacking {wheel.name} ({_size(wheel.stat().st_size)})")
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if WHEEL_SKIP.match(info.filename):
                    continue
                path = archive.extract(info, site_packages)
                mode = info.external_attr >> 16
                if mode & 0o777:  # zipfile drops permissions; keep the executable bits the wheel records
                    os.chmod(path, mode & 0o777)
        names.append(wheel.name)
    return names


# ---------------------------------------------------------------- helpers


def _precompile(sysroot: Sysroot, tmp: Path, final: Path, progress: Progress) -> None:
    """Byte-compile the standard library and packages now: Debian leaves that to postinst scripts we do
    not run, wheels ship no .pyc, and compiling on every start under QEMU would cost tens of seconds.
    Bytecode is the same on every 3.11 build, so the host compiles it when it is a 3.11 (seconds);
    -s/-p record the final paths in tracebacks."""
    targets = [str(sysroot.root / "usr" / "lib" / f"python{PYTHON_VERSION}"), str(sysroot.site_packages)]
    host_is_same = f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION
    python = [sys.executable] if host_is_same else sysroot.command([])
    progress(f"byte-compiling the standard library and packages ({'host' if host_is_same else 'emulated'} python)")
    # Some stdlib files are deliberately invalid (lib2to3 test data): failures are expected and harmless.
    subprocess.run([*python, "-m", "compileall", "-q", "-j", "0", "-s", str(tmp), "-p", str(final), *targets],
                   env=None if host_is_same else sysroot.environment(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


def _download(url: str, dest: Path, progress: Progress | None, sha256: str | None = None,
              size: int | None = None) -> None:
    """url -> dest, checking size and SHA256 when known. Any network failure is a TargetError naming url."""
    if progress is not None:
        progress(f"downloading {url}" + (f" ({_size(size)})" if size else ""))
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise TargetError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TargetError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    got = dest.stat().st_size
    if size is not None and got != size:
        raise TargetError(f"{url}: got {got} bytes, the index says {size}")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise TargetError(f"{url}: SHA256 {digest.hexdigest()} does not match the index's {sha256}")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise TargetError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")


def _remove_stale_builds(cache: Path, name: str, max_age_s: float = 86400.0) -> None:
    """Temporary directories of builds killed before they could clean up (a live build lasts minutes)."""
    for stale in cache.glob(f".{name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> int:
    try:
        sysroot = ensure_sysroot()
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the partial build is already removed; no traceback needed
        return 130
    print(sysroot.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
