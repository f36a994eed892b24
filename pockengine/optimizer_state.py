"""The optimizer state in torch.optim's `state_dict()` layout, to and from the program's own.

torch.optim numbers the parameters it was given, in order, across its param groups, and keeps a
parameter's state under its number once the parameter has had a gradient:

    {"state": {0: {"step": tensor(3.), "exp_avg": ..., "exp_avg_sq": ...}, 2: {...}},
     "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), ..., "params": [0, 1, 2, ...]}]}

The program's own layout is flat: `optimizer.<slot>.<parameter>`, `lr` and one `step` for all.
`torch.optim.AdamW(model.parameters())` numbers every parameter of the model, frozen ones (which
never get a state) included, in model.parameters() order; that is the numbering written here. An
optimizer given only the trained parameters numbers those alone: both are read back.

A partially trained weight (sparse.Partial) has state for its trained channels only; in torch's
layout the state is the whole weight's, zero in the frozen channels (what a gradient mask, as
sparse.apply_to_torch sets, leaves there), and only the trained channels are read back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .autodiff.step import slot_name
from .errors import StateError
from .frontend import to_numpy
from .optim import LR, STEP, Optimizer


@dataclass
class TorchOptimizerLayout:
    """How one program's optimizer state maps onto torch.optim's numbering."""

    optimizer: Optimizer
    parameters: list  # every parameter, trained or frozen, in model.parameters() order: torch's numbering
    trained: list  # the trained ones, in the same order
    shapes: dict  # {trained parameter: its shape in the model}
    partial: dict  # {partially trained parameter: autodiff.step.SplitWeight}

    def export(self, state: dict) -> dict:
        """{state name: array} (the program's optimizer state) -> torch.optim's layout, numpy arrays."""
        steps = int(state[STEP])
        entries = {}
        if steps > 0 and self.optimizer.slots():  # torch has no state for a parameter before its first step
            for name in self.trained:
                entry = {STEP: np.array(steps, "float32")} if self.optimizer.torch_state_has_step else {}
                for slot in self.optimizer.slots():
                    entry[slot] = self._whole(name, state[slot_name(slot, name)])
                entries[self.parameters.index(name)] = entry
        group = {LR: float(state[LR]), **self._hyperparameters(), "params": list(range(len(self.parameters)))}
        return {"state": entries, "param_groups": [group]}

    def read(self, state_dict: dict, steps_now: int) -> dict:
        """torch.optim's layout -> {state name: array} to load (lr, step and the slots); StateError
        naming the parameter or the hyper-parameter that does not fit the program."""
        groups = state_dict["param_groups"]
        lr = self._check_groups(groups)
        names = self._numbering(groups)
        entries = {}
        for index, entry in state_dict["state"].items():
            name = names.get(int(index))
            if name is None:
                raise StateError(f"load_optimizer_state_dict: state for parameter {index}, which no param group lists")
            if entry and name in self.shapes:  # trained here: a parameter frozen here needs no state
                entries[name] = entry
        arrays = {LR: np.array(lr, "float64"), **self._slots(entries)}
        steps = self._steps(entries, steps_now)
        if steps is not None:
            arrays[STEP] = np.array(steps, "int64")
        return arrays

    # ------------------------------------------------------------------ export

    def _whole(self, name: str, array: np.ndarray) -> np.ndarray:
        """A slot as torch holds it: the whole parameter's shape (a partially trained one's frozen
        channels zero)."""
        split = self.partial.get(name)
        if split is None:
            return array
        frozen = list(self.shapes[name])
        frozen[split.axis] -= split.channels
        return split.join(array, np.zeros(frozen, array.dtype))

    def _hyperparameters(self) -> dict:
        """The optimizer's arguments as torch.optim's param groups name them (tuples where torch has
        tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in asdict(self.optimizer).items()
                if k not in (LR, "qas")}  # qas: PockEngine's own, torch has no such argument

    # ------------------------------------------------------------------ read

    def _check_groups(self, groups: list) -> float:
        """The learning rate of torch's param groups; StateError for a hyper-parameter the program was
        not compiled with (they are constants of the compiled step) or for groups that differ."""
        ours = self._hyperparameters()
        kind = self.optimizer.kind
        for i, group in enumerate(groups):
            foreign = sorted((set(group) & OPTIMIZER_ARGUMENTS) - set(ours))
            if foreign:
                raise StateError(f"load_optimizer_state_dict: param_groups[{i}] has {', '.join(foreign)}: it is "
                                 f"another optimizer's state than the program's {kind}; compile the job with the "
                                 "optimizer that state belongs to")
            for key, value in ours.items():
                if key in group and not _same(group[key], value):
                    raise StateError(
                        f"load_optimizer_state_dict: param_groups[{i}] has {key}={_plain(group[key])!r}, "
                        f"the program is compiled with {kind}({key}={value!r}); "
                        "hyper-parameters are constants of the compiled step: compile the job with "
                        f"pe.optim.{kind}({key}={_plain(group[key])!r}) to continue this state")
        rates = {float(to_numpy(group[LR])) for group in groups}
        if len(rates) != 1:
            raise StateError(f"load_optimizer_state_dict: the param groups have learning rates {sorted(rates)}; the "
                             "program trains every parameter with one learning rate (program.lr)")
        return rates.pop()

    def _numbering(self, groups: list) -> dict:
        """{torch's parameter number: parameter name}: by the groups' `param_names` when torch kept
        them, else by position, for an optimizer given every parameter of the model or only the
        trained ones."""
        numbers = [int(n) for group in groups for n in group["params"]]
        given = [name for group in groups for name in group.get("param_names", [])]
        if given and len(given) == len(numbers):
            unknown = [name for name in given if name not in self.parameters]
            if unknown:
                raise StateError(f"load_optimizer_state_dict: the param groups name {unknown[:5]}, which are not "
                                 f"parameters of this model ({self.parameters[:5]}...)")
            return dict(zip(numbers, given))
        for names in (self.parameters, self.trained):
            if len(numbers) == len(names):
                return dict(zip(numbers, names))
        raise StateError(
            f"load_optimizer_state_dict: the param groups list {len(numbers)} parameters; the model has "
            f"{len(self.parameters)} ({len(self.trained)} trained here). Give torch.optim model.parameters() (or "
            "only the parameters this program trains, in model order)")

    def _slots(self, entries: dict) -> dict:
        """{slot state name: trained part} of the parameters torch has state for."""
        slots = self.optimizer.slots()
        arrays = {}
        for name, entry in entries.items():
            theirs = sorted(set(entry) - {STEP})
            if theirs != sorted(slots):
                raise StateError(f"load_optimizer_state_dict: the state of {name} holds {theirs}; the program's "
                                 f"{self.optimizer.kind} keeps {sorted(slots)} (compile the job with the optimizer "
                                 "that state belongs to)")
            for slot in slots:
                array = to_numpy(entry[slot])
                if tuple(array.shape) != tuple(self.shapes[name]):
                    raise StateError(f"load_optimizer_state_dict: {slot} of {name} has shape {tuple(array.shape)}, "
                                     f"the parameter's is {tuple(self.shapes[name])}")
                split = self.partial.get(name)
                arrays[slot_name(slot, name)] = split.split(array)[split.trained] if split else array
        if slots and entries:
            without = [name for name in self.trained if name not in entries]
            if without:
                raise StateError(
                    f"load_optimizer_state_dict: no state for {without[:5]}{'...' if len(without) > 5 else ''} while "
                    f"{len(entries)} other trained parameters have one; the program steps every trained parameter "
                    "together (one step count): load the state of an optimizer that stepped them all")
        elif slots:  # a fresh torch optimizer: fresh slots
            arrays.update({slot_name(slot, name): np.zeros(self._trained_shape(name))
                           for slot in slots for name in self.trained})
        return arrays

    def _steps(self, entries: dict, steps_now: int) -> int | None:
        """The step count the state continues from (None: keep the program's)."""
        if not self.optimizer.slots():
            return None  # nothing says how many steps were taken, and nothing depends on it
        if not entries:
            return 0
        if not self.optimizer.torch_state_has_step:
            # torch.optim.SGD counts no steps; its buffers exist once one was taken (dampening
            # treats the first step apart)
            return max(steps_now, 1)
        counts = {name: float(to_numpy(entry[STEP])) for name, entry in entries.items()}
        first = next(iter(counts))
        differ = [name for name, count in counts.items() if count != counts[first]]
        if differ:
            raise StateError(f"load_optimizer_state_dict: {differ[0]} has taken {counts[differ[0]]:g} steps, "
                             f"{first} {counts[first]:g}; the program steps every trained parameter together "
                             "(one step count)")
        return int(counts[first])

    def _trained_shape(self, name: str) -> tuple:
        split = self.partial.get(name)
        if split is None:
            return tuple(self.shapes[name])
        shape = list(self.shapes[name])
        shape[split.axis] = split.channels
        return tuple(shape)


def is_torch_layout(state_dict: dict) -> bool:
    return isinstance(state_dict, dict) and "state" in state_dict and "param_groups" in state_dict


# Hyper-parameters of torch.optim's SGD, Adam and AdamW param groups: one the program's optimizer
# lacks says the state is another optimizer's.
OPTIMIZER_ARGUMENTS = frozenset({"momentum", "dampening", "nesterov", "betas", "eps", "amsgrad",
                                 "decoupled_weight_decay", "weight_decay", "maximize"})


def _plain(value):
    """A torch or numpy scalar as a Python number, a tuple as it is, for messages and comparisons."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _same(theirs, ours) -> bool:
    return _plain(theirs) == _plain(ours)
