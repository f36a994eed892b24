"""PockEngine: a compile-time training engine on Apache TVM.

    import pockengine as pe
    job = pe.TrainingJob(model, example_inputs=(x,), example_targets=y, loss="cross_entropy",
                         optimizer=pe.optim.SGD(lr=0.05, momentum=0.9))
    program = pe.compile(job, target="host")
    loss = program.step(x, y)

This module imports neither torch nor TVM eagerly (its names load on first use): `pe.load(dir)` and
`step()` on a loaded artifact need only numpy and the TVM runtime, and the command line answers a
mistake in its arguments without the seconds those imports take. Nor does it change the environment:
thread counts go through TVM's API (targets/device_runner.py), and PyTorch's OpenMP threads beside
TVM's are handled where library kernels run (torch_kernels.py).
"""

from . import errors

__all__ = ["TrainingJob", "SparseUpdate", "search_sparse_update", "analyze_sparse_update", "compile",
           "compile_inference", "load", "Program", "InferenceProgram", "DeviceProgram", "to_torch", "optim", "errors",
           "targets", "quantize"]


def compile(job, target="host", *, tuning_logs=(), backend="tvm", patches=None, progress=None, verbose=False):  # noqa: A001 - the contract's name
    """Compile a TrainingJob for a target (preset name, TVM target dict or TVM tag) into a Program,
    or for another machine (aarch64, a GPU, a microcontroller) a DeviceProgram that exports its
    artifact. `tuning_logs`: MetaSchedule databases (directories written by `pockengine tune`) for
    the kernels they match. `backend` "auto" runs each heavy op on whichever of TVM and PyTorch's
    kernels measures faster, "library" on PyTorch's, "tvm" (default) on TVM's only — the artifact
    then needs no PyTorch to run. `patches`: "auto" runs the forward's frozen first layers patch by
    patch when that lowers the step's peak memory (MCUNetV2), (module path, grid) runs them up to
    that module's output on a grid x grid patch grid, None (default) not. `progress(stage index,
    stage count, name, seconds)` hears of each stage (seconds None when it starts, negative when it
    failed); `verbose` prints them instead."""
    from .build import compile as compile_job
    from .pipeline import print_progress

    if verbose and progress is not None:
        raise errors.InputError("compile: pass verbose=True (print the stages) or progress=... (hear of them), "
                                "not both")
    return compile_job(job, target, tuning_logs=tuning_logs, backend=backend, patches=patches,
                       progress=print_progress if verbose else progress)


def compile_inference(model, example_inputs, target="host", *, output=None, tuning_logs=(), progress=None,
                      verbose=False, name="inference"):
    """Compile the forward of a PyTorch model, in eval mode, into an InferenceProgram for this
    machine: `program(*inputs)` returns `output(model(*inputs))` as a numpy array, for inputs of
    the example inputs' shapes and dtypes; `program.export(dir)` writes the artifact and `load`
    reads it back (it runs with numpy and the TVM runtime, without PyTorch). `output` picks the
    tensor from what the model returns (default: the tensor itself, or a transformers output's
    `.logits`). A quantized base (pe.quantize.awq, smoothquant) stays quantized and LoRA adapters
    stay adapters. `tuning_logs`, `progress` and `verbose` as for compile."""
    from .build import compile_inference as compile_forward
    from .pipeline import print_progress

    if verbose and progress is not None:
        raise errors.InputError("compile_inference: pass verbose=True or progress=..., not both")
    return compile_forward(model, example_inputs, target, output=output, tuning_logs=tuning_logs,
                           progress=print_progress if verbose else progress, name=name)


def load(directory, threads=None):
    """Load an exported artifact directory as a Program; `threads`: worker threads for its kernels
    (default: chosen step by step among the CPUs available to this process, see Program.threads)."""
    from .runtime import load as _load

    return _load(directory, threads=threads)


def search_sparse_update(job, budget=None, *, data, eval_data, target="host", **options):
    """Find the sparse-update scheme that scores best on `eval_data` after short runs on `data` and
    fits `budget` bytes (or a size such as "256KB"; default the target's SRAM) of training memory on
    `target`: MCUNetV3's contribution analysis and a search over biases and per-layer channel ratios
    (pockengine/sparse_search.py, which lists the options). Returns a SearchResult: `.scheme` (a
    SparseUpdate), `.report()`, `.plot(png)`, `.save(json)`."""
    from .sparse_search import search

    return search(job, budget, data=data, eval_data=eval_data, target=target, **options)


def analyze_sparse_update(job, *, data, eval_data, target="host", **options):
    """The search's contribution analysis alone (what each bias depth and weight ratio buys on
    `eval_data`, what it costs on `target`): `.choose(budget)` returns the SearchResult at a budget,
    as search_sparse_update does, and may be called for several budgets without training again."""
    from .sparse_search import analyze

    return analyze(job, data=data, eval_data=eval_data, target=target, **options)


_LAZY = {"TrainingJob": ("job", "TrainingJob"), "SparseUpdate": ("sparse", "SparseUpdate"),
         "Program": ("runtime", "Program"), "DeviceProgram": ("runtime", "DeviceProgram"),
         "InferenceProgram": ("runtime", "InferenceProgram"),
         "to_torch": ("frontend", "to_torch"),
         "optim": ("optim", None), "targets": ("targets", None), "quantize": ("quantize", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pockengine' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = importlib.import_module(f".{module}", __name__)
    return getattr(value, attribute) if attribute else value
