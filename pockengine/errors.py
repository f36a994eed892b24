"""Every error a user can cause. Each message names the cause and the fix.

They derive from `PockEngineError` so a caller can catch them all, and from the matching built-in
exception (ValueError, TypeError, ...) so generic handlers keep working.
"""


class PockEngineError(Exception):
    """Base class of all errors PockEngine raises on purpose."""


class JobError(PockEngineError, ValueError):
    """The TrainingJob (or the train.py defining it) is malformed."""


class LossError(PockEngineError, ValueError):
    """The loss is unknown or does not produce a scalar."""


class UnsupportedOpError(PockEngineError, NotImplementedError):
    """An operator cannot be imported or has no gradient rule."""


class FrontendError(PockEngineError, ValueError):
    """The model could not be captured or imported (torch.export / ONNX)."""


class InputError(PockEngineError, ValueError):
    """A batch passed to step() does not match what the program was compiled for."""


class StateError(PockEngineError, ValueError):
    """A state dict passed to load_state_dict() does not match the program."""


class TargetError(PockEngineError, ValueError):
    """The target is unknown or cannot be built for on this machine."""


class ToolchainError(TargetError):
    """A compiler or emulator the target needs is not installed (the message names the package)."""


class NotRunnableHereError(TargetError, AttributeError):
    """A program built for another machine (runtime.DeviceProgram) was asked to run its step here.
    It has no step(): an AttributeError too, so hasattr() and getattr(..., default) say so; the
    message says how to run it where it belongs."""


class MemoryLimitError(TargetError):
    """The step does not fit the device's memory (the message says what it needs and what would fit)."""


class ArtifactError(PockEngineError, OSError):
    """An exported artifact is missing, corrupt or truncated."""


class OptimizerError(PockEngineError, ValueError):
    """Optimizer hyper-parameters are invalid."""


class InternalCompilerError(PockEngineError, RuntimeError):
    """PockEngine or TVM failed on a model it accepted: a bug to report, not a mistake in the model.
    The message names the build stage, the operations the failure points at and where in the model
    they come from."""


class NumericsError(PockEngineError, FloatingPointError):
    """A batch holds NaN or infinite values, or a step produced them (a diverging update): the
    message names the step and the first non-finite tensor. Nothing non-finite is saved."""
