"""Training MobileNetV2-0.35 on a microcontroller: SRAM and Flash by input resolution, full vs sparse.

    python benchmarks/mcu_memory.py                   # Cortex-M4 (256 KiB SRAM, 2 MiB Flash), 32..128 px
    python benchmarks/mcu_memory.py --small           # 32x32 only (what CI runs)
    python benchmarks/mcu_memory.py --target cortex-m55 --plot build/mcu_memory_m55.png

Each row is a firmware actually built: the training step (batch 1, SGD, BatchNorm frozen as TinyTL
and MCUNetV3 train) as a C project compiled with arm-none-eabi-gcc; SRAM and Flash are read from the
ELF (SRAM: arena + kernel workspace + the state the step writes + input + measured stack; Flash:
code, frozen weights and initial values). Firmware too big for the device is linked into unbounded
memory just to be measured. PyTorch's column is its eager training step with the same frozen set,
measured in this process (tensors alive at the peak, on top of parameters, gradients, buffers and
optimizer state; see sparse_memory.py): what the same training needs in RAM on a CPU. PyTorch has
no sub-tensor update: it computes a channel-ratio weight's whole gradient and masks it, so at these
resolutions its peak is the backward's weight gradients rather than the activations.

The row "MCUNetV3 + patches" is MCUNetV3's scheme built with `patches="auto"`: its frozen first
blocks run patch by patch (passes/patch_prefix.py) where that lowers the peak, which at 96-128 pixels
is where those blocks' activations make it. The "int8" rows are the same network quantized as
MCUNetV3 trains it (`pe.quantize.int8`, BatchNorm statistics from random batches, inputs taken as
int8, SGD with QAS): int8 activations and frozen weights, float trained parameters; their PyTorch
column is PyTorch eager training that quantized model (its integers in float tensors).

Then the largest resolution at which each sparse scheme fits the device's SRAM is searched in steps
of 8 pixels, and that firmware trains a few steps under QEMU next to PyTorch, counting the
instructions each step executes (QEMU -icount). The anchors are MCUNetV3's Tiny Training Engine,
which trains an MCUNet in 141 KB with int8, and its 373 ms per sparse step of MobileNetV2 on a
216 MHz Cortex-M7: about 81 M cycles. The largest fitting resolution is also given for 320 KiB (an
STM32F746's SRAM, TTE's board).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples", "mobilenetv2")]

from mobilenetv2 import MobileNetV2  # noqa: E402
from sparse_memory import freeze_batchnorm, measure_torch  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench  # noqa: E402
from pockengine.artifact_files import PROJECT  # noqa: E402
from pockengine.errors import MemoryLimitError  # noqa: E402
from pockengine.sparse import apply_to_torch  # noqa: E402
from pockengine.targets import cortex_m, resolve  # noqa: E402
from pockengine.targets.cortex_m.family import ONE_INSTRUCTION_PER_CYCLE, step_time  # noqa: E402

KiB = 1024
OTHER_BUDGET_KIB = 320  # an STM32F746's SRAM (the Cortex-M7 board MCUNetV3's numbers come from)
MCUNETV3_ANCHOR_KB = 141  # MCUNetV3 (Lin et al. 2022), Tiny Training Engine, int8
MCUNETV3_STEP_MS, MCUNETV3_CLOCK_HZ = 373, 216_000_000  # its sparse MobileNetV2 step on an STM32F746 (Cortex-M7)


def schemes() -> dict:
    """MobileNetV2-0.35's convs and linear layers, in model order, number 0..52: 47 and 50 are the
    projections of the last two blocks, 52 the classifier."""
    ratios = {"features.16.conv.2.weight": 0.125, "features.17.conv.2.weight": 0.125}
    return {
        "full": pe.SparseUpdate.full(),
        "bias + ratios": pe.SparseUpdate.bias_only() | ratios | {"classifier.1.weight": "full"},
        "MCUNetV3-style": pe.SparseUpdate.mcunetv3(12, "47-50-52", "0.125-0.125-1"),
    }


PATCHED, INT8, INT8_PATCHED = "MCUNetV3 + patches", "int8 MCUNetV3", "int8 MCUNetV3 + patches"


def rows_built() -> dict:
    """{row: (scheme name, patches, int8)}: every scheme as it is, MCUNetV3's with its frozen first
    layers run patch by patch where that lowers the peak (`pe.compile(..., patches="auto")`), and
    MCUNetV3's on the int8 model, without and with patches."""
    return {**{name: (name, None, False) for name in schemes()}, PATCHED: ("MCUNetV3-style", "auto", False),
            INT8: ("MCUNetV3-style", None, True), INT8_PATCHED: ("MCUNetV3-style", "auto", True)}


def make_job(resolution: int, scheme, seed: int = 0, int8: bool = False):
    """(job, the model it trains, x, y); `int8`: the model quantized (inputs int8, QAS)."""
    torch.manual_seed(seed)
    model = freeze_batchnorm(MobileNetV2(num_classes=10, width_mult=0.35))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 3, resolution, resolution, generator=g), torch.randint(0, 10, (1,), generator=g)
    optimizer = pe.optim.SGD(lr=0.05)
    if int8:
        model = quantized(model, resolution, g)
        # Calibrated BatchNorms pass a real signal (the float rows' random-initialised ones hardly
        # do): at 0.05 the float model's loss too jumps from 2.3 to 17 in one step of batch 1.
        x, optimizer = pe.quantize.quantize_input(model, x), pe.optim.SGD(lr=0.005, qas=True)
    job = pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", optimizer, sparse_update=scheme,
                         name=f"mobilenetv2_{resolution}")
    return job, model, x, y


def quantized(model, resolution: int, generator):
    """`model` quantized with pe.quantize.int8 (inputs int8), its BatchNorm statistics first taken
    from random batches: a random-initialised BatchNorm's are 0 and 1, a degenerate calibration."""
    calibration = [torch.randn(4, 3, resolution, resolution, generator=generator) for _ in range(2)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # the cumulative average of the calibration batches
        norm.train()
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    model.eval()
    return pe.quantize.int8(model, calibration, input="int8")


def firmware(job, target, patches=None):
    """(program or None when it does not fit, footprint as JSON)."""
    try:
        program = pe.compile(job, target=target, patches=patches)
        return program, program.meta["firmware"]
    except MemoryLimitError as e:
        return None, e.footprint.to_json()


def torch_peak(job, program, model, x, y) -> int:
    """PyTorch's training memory for the job, training what `program` trains (the plan is imported
    again only when the firmware did not fit and there is no program); QAS adds no memory, plain
    SGD stands in for it (torch.optim has none)."""
    reference = apply_to_torch(model, program.plan if program is not None else job.plan(job.import_model()))
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=job.optimizer.lr)
    x = x.to(next(reference.parameters()).dtype) if not x.is_floating_point() else x
    return measure_torch(reference, optimizer, x, y, repeats=1)[0]


def largest_fitting(scheme, target, rows, name: str, sram: int, search: bool = True, patches=None, int8=False):
    """(resolution, SRAM, Flash) of the largest multiple of 8 whose firmware fits `sram`, searched
    upwards from the largest measured resolution that fits (without `search`: the largest measured
    one); None when none measured fits."""
    measured = {r[0]: (r[2], r[3]) for r in rows if r[1] == name}
    fitting = [res for res, (ours, _) in measured.items() if ours <= sram]
    if not fitting:
        return None
    best = max(fitting)
    found = (best, *measured[best])
    resolution = best + 8
    while search and resolution not in measured:  # the next measured resolution does not fit: no need to go there
        fp = firmware(make_job(resolution, scheme, int8=int8)[0], target, patches)[1]
        print(f"  {resolution}x{resolution}: SRAM {fp['sram'] / KiB:.1f} KiB", file=sys.stderr, flush=True)
        if fp["sram"] > sram:
            break
        found = (resolution, fp["sram"], fp["flash"])
        resolution += 8
    return found


def train_under_qemu(scheme, resolution: int, target, steps: int, program=None, int8=False, patches=None) -> tuple:
    """(losses on the device, PyTorch's losses, instructions per step on the device) for `steps`
    batches at `resolution`; `program`: the firmware of make_job(resolution, scheme, int8=int8) when
    it was already built (make_job is deterministic). PyTorch trains the int8 model with QAS done by
    pe.quantize.scale_gradients_qas."""
    job, model, _, _ = make_job(resolution, scheme, int8=int8)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 3, resolution, resolution, generator=g), torch.randint(0, 10, (1,), generator=g))
               for _ in range(steps)]
    if int8:
        batches = [(pe.quantize.quantize_input(model, x), y) for x, y in batches]
    if program is None:
        program = pe.compile(job, target=target, patches=patches)
    with tempfile.TemporaryDirectory() as tmp:
        program.export(tmp + "/fw")
        project = os.path.join(tmp, "fw", PROJECT)
        cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
        ran = cortex_m.run(project, resolve(target), steps, program.signature)
    reference = apply_to_torch(model, program.plan)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=job.optimizer.lr)
    theirs = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(x), y)
        loss.backward()
        if int8:
            pe.quantize.scale_gradients_qas(reference)
        optimizer.step()
        theirs.append(loss.item())
    return ran.losses, theirs, ran.instructions


def plot(rows, sram: int, target: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, scheme in enumerate(dict.fromkeys(r[1] for r in rows)):
        mine = sorted((r[0], r[2] / KiB, r[4] / KiB) for r in rows if r[1] == scheme)
        xs = [m[0] for m in mine]
        ax.plot(xs, [m[1] for m in mine], marker="o", color=f"C{i}", label=f"ours (SRAM), {scheme}")
        ax.plot(xs, [m[2] for m in mine], marker=".", linestyle=":", color=f"C{i}", alpha=0.7,
                label=f"PyTorch eager (RAM), {scheme}")
    ax.axhline(sram / KiB, color="red", linewidth=1)
    ax.annotate(f"{target} SRAM {sram // KiB} KiB", (0.01, sram / KiB), xycoords=("axes fraction", "data"),
                xytext=(0, 3), textcoords="offset points", color="red", fontsize=8)
    anchor = MCUNETV3_ANCHOR_KB * 1000 / KiB
    ax.axhline(anchor, color="gray", linestyle="--", linewidth=1)
    ax.annotate("MCUNetV3 TTE, int8: 141 KB", (0.01, anchor), xycoords=("axes fraction", "data"), xytext=(0, 3),
                textcoords="offset points", color="gray", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("input resolution (pixels per side), batch 1")
    ax.set_ylabel("training memory (KiB, log)")
    ax.set_title("MobileNetV2-0.35 training step (batch 1; float32 unless int8)", fontsize=10)
    ax.legend(fontsize=7)
    return bench.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cortex-m4", help="a Cortex-M preset (default cortex-m4)")
    parser.add_argument("--resolutions", default="32,48,64,96,128", help="comma-separated (default 32,48,64,96,128)")
    parser.add_argument("--small", action="store_true",
                        help="resolution 32 only, no search for the largest that fits (for CI)")
    parser.add_argument("--steps", type=int, default=3, help="steps under QEMU at the largest fitting resolution")
    parser.add_argument("--plot", default=os.path.join("build", "mcu_memory.png"),
                        help="PNG to draw (default %(default)s)")
    args = parser.parse_args(argv)
    preset = resolve(args.target)
    if preset.family != "cortex-m":
        parser.error(f"{args.target} is not a Cortex-M target")
    resolutions = [32] if args.small else [int(r) for r in args.resolutions.split(",")]
    sram, flash = preset.sram_bytes, preset.flash_bytes

    rows = []  # (resolution, row name, our SRAM, our Flash, PyTorch bytes)
    built = {}  # (resolution, row name) -> its firmware, when it fits
    patched = {}  # (resolution, row) -> the patched prefix's choice, when a patched row has one
    for resolution in resolutions:
        theirs = {}  # (scheme, int8) -> PyTorch's bytes (patches change nothing in PyTorch's step)
        for name, (scheme_name, patches, int8) in rows_built().items():
            print(f"[{resolution}x{resolution} / {name}] building the firmware ...", file=sys.stderr, flush=True)
            job, model, x, y = make_job(resolution, schemes()[scheme_name], int8=int8)
            program, fp = firmware(job, args.target, patches)
            if (scheme_name, int8) not in theirs:
                theirs[(scheme_name, int8)] = torch_peak(job, program, model, x, y)
            rows.append((resolution, name, fp["sram"], fp["flash"], theirs[(scheme_name, int8)]))
            if program is not None:
                built[(resolution, name)] = program
                if program.meta.get("patches"):
                    patched[(resolution, name)] = program.meta["patches"]

    print(f"\nMobileNetV2-0.35, batch 1, SGD, BatchNorm frozen, float32 unless int8; {preset.name}: SRAM "
          f"{sram // KiB} KiB, Flash {flash // KiB} KiB")
    header = (f"{'resolution':<12}{'scheme':<25}{'SRAM KiB':>10}{'Flash KiB':>11}{'fits':>6}"
              f"{'PyTorch KiB':>13}{'ratio':>8}")
    print(header)
    print("-" * len(header))
    for resolution, name, ours, rom, theirs in rows:
        fits = "yes" if ours <= sram and rom <= flash else "no"
        print(f"{f'{resolution}x{resolution}':<12}{name:<25}{ours / KiB:>10.1f}{rom / KiB:>11.1f}{fits:>6}"
              f"{theirs / KiB:>13.1f}{theirs / ours:>7.1f}x")
    print("ratio = PyTorch's training memory / our firmware's SRAM (frozen weights live in Flash on the device)")
    for (resolution, name), choice in patched.items():
        print(f"{name} at {resolution}x{resolution}: up to {choice['split']} on a {choice['grid']}x{choice['grid']} "
              f"grid, +{100 * choice['overhead']:.1f}% of the prefix's convolution FLOPs")

    found = {}
    for budget in dict.fromkeys([sram, OTHER_BUDGET_KIB * KiB]):
        print(f"\nlargest resolution whose training step fits {budget // KiB} KiB of SRAM (steps of 8 pixels):")
        for name, (scheme_name, patches, int8) in rows_built().items():
            if name == "full":
                continue
            print(f"[{name}] searching for the largest resolution that fits {budget // KiB} KiB ...", file=sys.stderr,
                  flush=True)
            best = largest_fitting(schemes()[scheme_name], args.target, rows, name, budget, search=not args.small,
                                   patches=patches, int8=int8)
            found[name if budget == sram else (name, budget // KiB)] = best
            print(f"  {name:<25}" + (f"{best[0]}x{best[0]}: SRAM {best[1] / KiB:.1f} KiB, Flash {best[2] / KiB:.1f} KiB"
                                     if best else f"none of {', '.join(map(str, resolutions))}"))
    full_fits = [r[0] for r in rows if r[1] == "full" and r[2] <= sram]
    print(f"  {'full':<25} (at {sram // KiB} KiB) " + (f"{max(full_fits)}x{max(full_fits)}" if full_fits else
                               f"none of {', '.join(map(str, resolutions))}: "
                               "the weights it writes alone exceed the SRAM"))
    print(f"anchor: MCUNetV3's Tiny Training Engine trains an MCUNet in {MCUNETV3_ANCHOR_KB} KB with int8 weights and "
          "activations.")

    on_device = {}
    for name in ("MCUNetV3-style", INT8_PATCHED):
        if not (args.steps and found.get(name)):
            continue
        scheme_name, patches, int8 = rows_built()[name]
        resolution = found[name][0]
        print(f"[{name}] training {args.steps} steps at {resolution}x{resolution} under QEMU ...", file=sys.stderr,
              flush=True)
        ours, theirs, instructions = on_device[name] = train_under_qemu(
            schemes()[scheme_name], resolution, args.target, args.steps, built.get((resolution, name)), int8, patches)
        print(f"\n{name} at {resolution}x{resolution} on QEMU's {preset.board['qemu_machine']} ({preset.name}), "
              f"{args.steps} steps: losses " + " ".join(f"{v:.5f}" for v in ours)
              + "; PyTorch eager " + " ".join(f"{v:.5f}" for v in theirs)
              + f" (largest difference {max(abs(a - b) for a, b in zip(ours, theirs)):.1e})")
        print("instructions per training step: " + ", ".join(f"{n / 1e6:.2f} M" for n in instructions)
              + f" ({step_time(max(instructions), preset.clock_hz)}, one per cycle)")
    if on_device:
        print(f"anchor: MCUNetV3's Tiny Training Engine reports {MCUNETV3_STEP_MS} ms per sparse step of "
              f"MobileNetV2 on a {MCUNETV3_CLOCK_HZ / 1e6:.0f} MHz Cortex-M7, about "
              f"{MCUNETV3_STEP_MS * MCUNETV3_CLOCK_HZ / 1e9:.0f} M cycles (int8, its own resolution and scheme).\n"
              + ONE_INSTRUCTION_PER_CYCLE)
    if args.plot:
        print(f"wrote {plot(rows, sram, preset.name, args.plot)}")
    return {"rows": rows, "largest": found, "on_device": on_device}


if __name__ == "__main__":
    main()
