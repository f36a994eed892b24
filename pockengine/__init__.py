"""PockEngine: a compile-time training engine on Apache TVM.

    import pockengine as pe
    job = pe.TrainingJob(model, example_inputs=(x,), example_targets=y, loss="cross_entropy",
                         optimizer=pe.optim.SGD(lr=0.05, momentum=0.9))
    program = pe.compile(job, target="host")
    loss = program.step(x, y)

This module imports neither torch nor TVM's compiler eagerly: `pe.load(dir)` and `step()` on a
loaded artifact need only numpy and the TVM runtime.
"""

from . import errors, optim
from .job import TrainingJob
from .sparse import SparseUpdate

__all__ = ["TrainingJob", "SparseUpdate", "compile", "load", "optim", "errors", "targets"]


def compile(job, target="host", verbose=False, tuning_logs=()):  # noqa: A001 - the contract's name
    """Compile a TrainingJob for a target (preset name, TVM target dict or TVM tag), applying the
    MetaSchedule databases in `tuning_logs` (directories written by `pockengine tune`)."""
    from .build import compile as _compile, print_progress

    return _compile(job, target, progress=print_progress if verbose else None, tuning_logs=tuning_logs)


def load(directory):
    """Load an exported artifact directory as a Program."""
    from .runtime import load as _load

    return _load(directory)


def __getattr__(name):
    if name == "targets":
        import importlib

        return importlib.import_module(".targets", __name__)
    raise AttributeError(name)
