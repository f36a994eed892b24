"""Writing artifact directories without ever losing a user's files.

- A destination is refused unless it is absent, an empty directory or a PockEngine artifact
  (`force` replaces anything else, but never the working directory, a directory holding it or the
  home directory).
- The new artifact is assembled beside the destination and swapped in with one atomic exchange
  (renameat2 RENAME_EXCHANGE), so a crash at any instant leaves the old artifact or the new one.
  Where the file system cannot exchange, two renames are used and a crash between them is repaired
  by the next write or load (`recover`).
- Temporary names carry the writer's pid: what a killed writer left is removed by the next one.
- Files and directories get the permissions the umask gives, like every other tool's output.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import tempfile

from .errors import ArtifactError
from .targets.device_runner import EXAMPLE, remove_path, remove_stale, umask, write_atomically, writer_alive

FORMAT = "pockengine-artifact"
FORMAT_VERSION = 2  # 2: partially trained weights are stored as their two parts
# The files of an artifact. Every one has the manifest and the state; the rest depends on the family.
MANIFEST, STATE = "manifest.json", "state.npz"
EXAMPLE = EXAMPLE  # the batch it was compiled for: `pockengine run` trains on it without --data
LIBRARY = "train_step.so"  # the compiled step (host, aarch64, CUDA)
RUNNER = "run_step.py"  # device_runner.py, for a device without PockEngine (aarch64, CUDA)
PTX_FILE, SOURCE_FILE = "kernels.ptx", "kernels.cu"  # a CUDA build's kernels, for inspection
PROJECT = "project"  # a Cortex-M build's C project
TMP_TAG, OLD_TAG = ".tmp-", ".old-"
WRITE_TMP_PREFIX = ".pockengine-write-"  # write_file_atomically's temporary files, beside the user's


def is_artifact(path: str) -> bool:
    """Whether `path` is a directory holding a PockEngine manifest (complete or not)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(path: str, force: bool = False, protect: tuple = ()) -> None:
    """Refuse to write an artifact where it would replace something that is not one. `protect`:
    files the destination must not contain (the train.py being built)."""
    path = os.path.realpath(path)
    home = os.path.realpath(os.path.expanduser("~"))
    for precious, what in [(os.getcwd(), "the current directory"), (home, "your home directory"),
                           *((os.path.realpath(p), p) for p in protect)]:
        if precious == path or precious.startswith(path.rstrip(os.sep) + os.sep):
            raise ArtifactError(f"refusing to write an artifact to {path}: it is or contains {what}, which "
                                "would be replaced. Choose a new directory, e.g. build/<name>")
    check_writable(os.path.dirname(path))  # the artifact is assembled beside its destination
    if not os.path.lexists(path) or force:
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ArtifactError(f"{path} exists and is not a directory; PockEngine replaces only its own artifacts. "
                            "Choose another path, or pass --force (export(..., force=True)) to replace it")
    if os.listdir(path) and not is_artifact(path):
        raise ArtifactError(f"{path} holds files that are not a PockEngine artifact (no {MANIFEST}); they would be "
                            "deleted. Choose another path, or pass --force (export(..., force=True)) to replace them")


def check_writable(directory: str) -> None:
    """PermissionError (EACCES) or OSError (EROFS) naming the directory when files cannot be created in
    `directory`, or in the nearest existing directory above it (where it would be created): raised
    before a build's minutes or a run's steps, not when their result is written."""
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)


def make_temp_directory(dest: str) -> str:
    """An empty directory beside `dest` to assemble its new version in (removed by the next writer if
    this process dies)."""
    parent, name = os.path.split(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent, f".{name}{TMP_TAG}")
    remove_stale(parent, f".{name}{OLD_TAG}")
    tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_TAG}{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    return tmp


def replace_directory(new: str, dest: str) -> None:
    """Put the directory `new` at `dest` atomically; whatever was at `dest` is removed."""
    try:
        os.rename(new, dest)  # dest absent (or an empty directory): one atomic rename
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if exchange(new, dest):
        remove_path(new)  # it holds the old artifact now
        return
    # No exchange on this file system: two renames, and a crash between them leaves `dest` absent
    # with both versions beside it; recover() then puts the new, complete one in place.
    parent, name = os.path.split(os.path.abspath(dest))
    old = tempfile.mkdtemp(prefix=f".{name}{OLD_TAG}{os.getpid()}-", dir=parent)
    os.rmdir(old)
    os.rename(dest, old)
    os.rename(new, dest)
    remove_path(old)


def recover(dest: str) -> bool:
    """If a writer died between the two renames of replace_directory's fallback, move the complete
    version it left beside `dest` into place. Whether anything was recovered."""
    if os.path.lexists(dest):
        return False
    parent, name = os.path.split(os.path.abspath(dest))
    if not os.path.isdir(parent):
        return False
    for tag in (TMP_TAG, OLD_TAG):  # the new version is complete once the old one has been moved away
        for entry in sorted(os.listdir(parent)):
            candidate = os.path.join(parent, entry)
            if entry.startswith(f".{name}{tag}") and not writer_alive(entry[len(name) + 1 + len(tag):]) \
                    and _manifest_complete(candidate):
                try:
                    os.rename(candidate, dest)
                    return True
                except OSError:
                    return os.path.exists(dest)  # another process recovered it first
    return False


def exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _manifest_complete(path: str) -> bool:
    """A directory whose manifest is written (it is written last) and names only files present."""
    if not is_artifact(path):
        return False
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f).get("files", {})
    return all(os.path.exists(os.path.join(path, name)) for name in files.values())


def read_manifest(directory: str) -> dict:
    """The manifest of the artifact at `directory`, checked; an ArtifactError says what is wrong and
    the fix. Needs neither TVM nor PyTorch, so that the CLI refuses a bad artifact at once."""
    recover(directory)  # a writer killed between the two renames of a swap left it beside its place
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"no PockEngine artifact at {directory}: {MANIFEST} is missing "
                            "(build one with `pockengine build train.py -o DIR`)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt or truncated ({e}); rebuild the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a PockEngine manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}, this PockEngine reads "
                            f"{FORMAT_VERSION}; rebuild the artifact")
    required = REQUIRED_KEYS if manifest.get("kind") != "inference" else set(REQUIRED_KEYS) - {"optimizer"}
    missing = [k for k in REQUIRED_KEYS if k in required and k not in manifest]
    if missing or not isinstance(manifest.get("files"), dict) or "state" not in manifest["files"]:
        raise ArtifactError(f"{path} is incomplete or was edited: it lacks {', '.join(missing) or 'files.state'}; "
                            "rebuild the artifact")
    return manifest


# What every manifest written by export() has, and load(), run and inspect read (an inference
# artifact's, kind "inference", has no optimizer).
REQUIRED_KEYS = ("name", "target", "tvm_target", "optimizer", "source", "state_dict_keys", "signature", "parameters",
                 "buffers", "memory", "versions", "files")


def write_file_atomically(path: str, data: bytes) -> str:
    """Write one file (a saved scheme, a report's plot) so that a crash at any instant leaves the old
    file or the new one whole."""
    return write_atomically(path, lambda f: f.write(data), WRITE_TMP_PREFIX)


def write_figure(fig, path: str) -> str:
    """Write a matplotlib figure as a PNG at `path` (directories made, the file written atomically)
    and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_file_atomically(path, image.getvalue())
