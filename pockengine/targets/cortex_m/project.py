"""Write the self-contained C project of a Cortex-M training step.

    kernels.c          the step's TIR kernels from TVM's C code generator, plain pointer ABI (kernels.py)
    pe_train_step.c    the driver: kernel calls on one static arena (driver.py), the API below
    pe_train_step.h    int pe_train_step(const float* x, const int* y, float* loss); lr get/set; state table
    pe_state.S         parameters and optimizer state, included from state/*.bin: trainable and
                       optimizer state in .data (SRAM, initial values in Flash), frozen weights in
                       .rodata (Flash only), zero-initialised state in .bss
    pe_tvm.h           the few declarations TVM's generated C expects (instead of TVM's headers)
    harness.c          a test main for QEMU: batches from a file and the step count through
                       semihosting, the loss and the instructions executed per step on stdout, the
                       trained state written back
    pe_counter.c .h    the harness's instruction counter: SysTick under QEMU's -icount
    calibrate.c        `make calibrate`: the counter on loops of known length
    startup.c link.ld  vector table, reset handler (FPU on), memory map of the board
    measure.ld         the same layout with unbounded memory: sizes of firmware too big for the board
    Makefile           `make` builds firmware.elf; `make run STEPS=N` runs it under qemu-system-arm;
                       `make measure` links firmware-measure.elf with measure.ld

Tensor data travel as raw little-endian files assembled in with .incbin: exact, and fast to
compile even for megabytes of weights (C initialisers of that size take the compiler minutes).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from ...autodiff.step import StepSignature
from .driver import Driver, c_name, c_type

ARENA_ALIGNMENT = 64
# measure.ld: the board's layout with room for anything, to read the sizes of firmware too big for
# the board (`make measure`; the result is for reading, not for running).
MEASURE_MEMORY = {"flash_origin": 0x0, "flash_bytes": 0x10000000, "sram_origin": 0x20000000, "sram_bytes": 0x10000000,
                  "rom_origin": 0x40000000, "rom_bytes": 0x10000000}
STACK_BYTES = 8 * 1024  # reserved below the top of SRAM; the build checks the measured need against it

# The C API takes labels as int (what a microcontroller application has); the step's kernels read
# int64, so the driver widens them into a buffer of its own.
API_TYPES = {"int64": ("int", "int64_t")}


# pe_train_step's error codes (PE_ERROR_* in pe_train_step.h; the QEMU harness prints them).
ERROR_NON_FINITE_INPUT, ERROR_INDEX_OUT_OF_RANGE = 1, 2


def api_type(dtype: str) -> str:
    return API_TYPES[dtype][0] if dtype in API_TYPES else c_type(dtype)


def _count(spec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64))


def state_symbol(name: str) -> str:
    return "pe_s_" + c_name(name)


def input_symbol(name: str) -> str:
    return "pe_in_" + c_name(name)


def write_project(directory: str, *, kernels_c: str, driver: Driver, signature: StepSignature, state: dict,
                  workspace_bytes: int, board: dict, batches: list | None = None) -> None:
    """Write every file of the project into `directory` (which exists)."""
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    files = {
        "pe_tvm.h": PE_TVM_H,
        "kernels.c": _kernels_source(kernels_c),
        "pe_train_step.h": _api_header(signature),
        "kernels.h": _kernel_declarations(kernels_c),
        "pe_batch.h": _batch_header(signature),
        "pe_train_step.c": _driver_source(driver, signature, workspace_bytes),
        "pe_state.S": _state_assembly(signature, state, directory),
        "harness.c": HARNESS_C,
        "pe_counter.h": COUNTER_H,
        "pe_counter.c": COUNTER_C,
        "calibrate.c": CALIBRATE_C,
        "startup.c": STARTUP_C,
        "link.ld": _linker_script(board["memory_map"]),
        "measure.ld": _linker_script({**board["memory_map"], **MEASURE_MEMORY}),
        "Makefile": MAKEFILE.format(cflags=" ".join(board["cflags"]), machine=board["qemu_machine"],
                                    cpu_hz=board["qemu_cpu_hz"]),
    }
    for name, text in files.items():
        _write(os.path.join(directory, name), text)
    if batches is not None:
        write_batches(directory, signature, batches)


def write_batches(directory: str, signature: StepSignature, batches: list) -> None:
    """batches.bin: each batch's inputs in order, in the C API's types; the harness cycles through them."""
    chunks = []
    for batch in batches:
        for spec, array in zip(signature.batch, batch):
            api = API_TYPES.get(spec.dtype, (None, None))[0]
            dtype = "int32" if api == "int" else spec.dtype
            chunks.append(np.ascontiguousarray(np.asarray(array).reshape(spec.shape), dtype=dtype).tobytes())
    _write(os.path.join(directory, "batches.bin"), b"".join(chunks))


def write_state(directory: str, signature: StepSignature, state: dict) -> None:
    """Make the firmware start from `state` (the artifact's state.npz): the next `make` links it in.
    Unchanged files are left alone, so an unchanged state rebuilds nothing."""
    _write(os.path.join(directory, "pe_state.S"), _state_assembly(signature, state, directory))


def mutable_state(signature: StepSignature) -> list:
    """The state the step writes, and the learning rate the application may set, in signature order.
    Everything else (frozen weights, BatchNorm statistics in eval mode) is constant: Flash only."""
    written = set(signature.outputs) | {"lr"}
    return [s for s in signature.state if s.name in written]


def _constant_state(signature: StepSignature) -> set:
    mutable = {s.name for s in mutable_state(signature)}
    return {s.name for s in signature.state if s.name not in mutable}


def _write(path: str, content) -> None:
    """Write atomically, and not at all when the file already holds `content` (make keeps its outputs)."""
    mode = "wb" if isinstance(content, bytes) else "w"
    try:
        with open(path, "rb" if mode == "wb" else "r") as f:
            if f.read() == content:
                return
    except OSError:
        pass
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        f.write(content)
    os.replace(tmp, path)


def _kernels_source(source: str) -> str:
    # TVM's generated file includes TVM's runtime headers for a handful of macros and the
    # workspace functions; pe_tvm.h declares exactly those, so the project needs no TVM install.
    source = re.sub(r'#define TVM_EXPORTS\n', "", source)
    source = re.sub(r'#include "tvm/[^"]+"\n', "", source)
    source = source.replace("void* __tvm_ffi__library_ctx = NULL;\n", "")
    return '#include "pe_tvm.h"\n' + source


def _linker_script(memory_map: dict) -> str:
    """Code (and the vector table) in the board's code memory; constants there too, or in a memory
    of their own when the board has one (its code memory is small)."""
    separate = memory_map["separate_rom"]
    rom = (f"\n         ROM (r)    : ORIGIN = {memory_map['rom_origin']:#x}, LENGTH = {memory_map['rom_bytes']}"
           if separate else "")
    return LINK_LD.format(**memory_map, stack=STACK_BYTES, rom=rom,
                          text_rodata="" if separate else " *(.rodata*)",
                          rodata_section="  .rodata : { *(.rodata*) } > ROM\n" if separate else "",
                          load="ROM" if separate else "FLASH")


def _kernel_declarations(source: str) -> str:
    declarations = re.findall(r"^TVM_DLL (void pe_k_\w+\([^)]*\));", source, flags=re.M)
    return '#include "pe_tvm.h"\n' + "\n".join(d + ";" for d in declarations) + "\n"


def _batch_header(signature: StepSignature) -> str:
    """The harness's buffer for one batch, laid out as batches.bin stores it."""
    fields = " ".join(f"{api_type(s.dtype)} {c_name(s.name)}[{max(1, _count(s))}];" for s in signature.batch)
    args = ", ".join(f"pe_batch.{c_name(s.name)}" for s in signature.batch)
    reads = " && ".join(f"fread(pe_batch.{c_name(s.name)}, 1, sizeof(pe_batch.{c_name(s.name)}), f) == "
                        f"sizeof(pe_batch.{c_name(s.name)})" for s in signature.batch)
    return (f"static struct {{ {fields} }} pe_batch;\n"
            f"#define PE_BATCH_ARGS {args}\n"
            f"#define PE_READ_BATCH(f) ({reads})\n")


def _api_header(signature: StepSignature) -> str:
    params = ", ".join(f"const {api_type(s.dtype)}* {c_name(s.name)}" for s in signature.batch)
    shapes = "\n".join(f" *   {c_name(s.name)}: {s.dtype} {list(s.shape)} (passed as {api_type(s.dtype)})"
                       for s in signature.batch)
    return f"""/* Generated by PockEngine: one training step of this model, ahead of time, no malloc. */
#ifndef PE_TRAIN_STEP_H
#define PE_TRAIN_STEP_H
#include <stdint.h>

/* pe_train_step's results. A batch the step must not train on is refused before any state is
 * written (as the host's Program.step refuses it): the model and optimizer state are untouched. */
#define PE_OK 0
#define PE_ERROR_NON_FINITE_INPUT {ERROR_NON_FINITE_INPUT}   /* a float input holds NaN or an infinity: PyTorch's loss would be NaN */
#define PE_ERROR_INDEX_OUT_OF_RANGE {ERROR_INDEX_OUT_OF_RANGE} /* a label or id lies outside what its operation accepts: PyTorch raises */

/* One forward + backward + optimizer update on a batch; writes the batch's loss.
{shapes}
 * Returns PE_OK, or one of the errors above. */
int pe_train_step({params}, float* loss);

double pe_get_lr(void);
void pe_set_lr(double lr);

/* The state the step trains (parameters, buffers, optimizer slots), to save or restore it. */
typedef struct {{ const char* name; void* data; uint32_t bytes; }} pe_tensor_t;
extern const pe_tensor_t pe_mutable_state[];
extern const int pe_mutable_state_count;

#endif
"""


def _driver_source(driver: Driver, signature: StepSignature, workspace_bytes: int) -> str:
    lines = ['#include <string.h>', '#include "pe_tvm.h"', '#include "pe_train_step.h"', '#include "kernels.h"', ""]
    constant = _constant_state(signature)
    for s in signature.state:
        const = "const " if s.name in constant else ""
        lines.append(f"extern {const}{c_type(s.dtype)} {state_symbol(s.name)}[{max(1, _count(s))}];")
    lines.append("")
    if driver.arena_bytes:
        lines.append(f"static uint8_t pe_arena[{driver.arena_bytes}] __attribute__((aligned({ARENA_ALIGNMENT})));")
    for symbol, dtype, count in driver.output_buffers:
        lines.append(f"static {c_type(dtype)} {symbol}[{max(1, count)}] __attribute__((aligned(16)));")
    for k in driver.constants:
        values = ", ".join(_c_literal(v, k.dtype) for v in k.values.ravel()) or "0"
        lines.append(f"static const {c_type(k.dtype)} {k.symbol}[{max(1, k.values.size)}] = {{{values}}};")
    widened = [s for s in signature.batch if s.dtype in API_TYPES]
    for s in widened:
        lines.append(f"static {API_TYPES[s.dtype][1]} {input_symbol(s.name)}[{max(1, _count(s))}];")
    lines.append("")
    lines.append(WORKSPACE_C.format(bytes=max(16, workspace_bytes)))
    params = ", ".join(f"const {api_type(s.dtype)}* {c_name(s.name)}" for s in signature.batch)
    lines.append(f"int pe_train_step({params}, float* loss) {{")
    lines.extend(_batch_checks(signature))
    for s in signature.batch:
        if s.dtype in API_TYPES:
            lines.append(f"  for (int i = 0; i < {_count(s)}; ++i) {input_symbol(s.name)}[i] = "
                         f"({API_TYPES[s.dtype][1]}){c_name(s.name)}[i];")
        else:
            lines.append(f"  {c_type(s.dtype)}* {input_symbol(s.name)} = ({c_type(s.dtype)}*){c_name(s.name)};")
    lines.extend("  " + statement for statement in driver.body)
    loss, *updates = driver.outputs
    lines.append(f"  *loss = (float)({loss})[0];")
    for spec_name, value in zip(signature.outputs, updates):
        spec = next(s for s in signature.state if s.name == spec_name)
        target = f"(({c_type(spec.dtype)}*){state_symbol(spec.name)})"
        if value != target:  # update_in_place left this one elsewhere: copy it home
            lines.append(f"  if ((void*){value} != (void*){state_symbol(spec.name)}) "
                         f"memcpy({state_symbol(spec.name)}, {value}, {spec.nbytes});")
    lines.append("  return 0;\n}\n")
    lr = next((s for s in signature.state if s.name == "lr"), None)
    if lr is not None:
        lines.append(f"double pe_get_lr(void) {{ return (double){state_symbol('lr')}[0]; }}")
        lines.append(f"void pe_set_lr(double lr) {{ {state_symbol('lr')}[0] = ({c_type(lr.dtype)})lr; }}")
    else:
        lines.append("double pe_get_lr(void) { return 0.0; }\nvoid pe_set_lr(double lr) { (void)lr; }")
    table = [f'  {{"{s.name}", (void*){state_symbol(s.name)}, {s.nbytes}u}},' for s in mutable_state(signature)]
    lines.append("const pe_tensor_t pe_mutable_state[] = {\n" + "\n".join(table) + "\n};")
    lines.append(f"const int pe_mutable_state_count = {len(table)};")
    return "\n".join(lines) + "\n"


# The exponent bits that are all ones for NaN and the infinities: tested on the bits, as a compiler
# may assume finite floats where isfinite() is concerned.
_NON_FINITE_BITS = {"float32": ("uint32_t", "0x7f800000u"), "float64": ("uint64_t", "0x7ff0000000000000ull")}


def _batch_checks(signature: StepSignature) -> list:
    """pe_train_step's first statements: the checks of device_runner.batch_problem, as error codes."""
    lines = []
    for s in signature.batch:
        if s.dtype in _NON_FINITE_BITS:
            bits, mask = _NON_FINITE_BITS[s.dtype]
            lines += [f"  for (int i = 0; i < {_count(s)}; ++i) {{",
                      f"    {bits} b; memcpy(&b, &{c_name(s.name)}[i], sizeof b);",
                      f"    if ((b & {mask}) == {mask}) return PE_ERROR_NON_FINITE_INPUT;", "  }"]
    inputs = {s.name: s for s in signature.batch}
    for r in signature.index_ranges:
        ignored = "".join(f" && v != {int(v)}" for v in r.ignored)
        lines += [f"  for (int i = 0; i < {_count(inputs[r.input])}; ++i) {{  /* {r.op}: [0, {r.size}) */",
                  f"    long long v = (long long){c_name(r.input)}[i];",
                  f"    if ((v < 0 || v >= {r.size}){ignored}) return PE_ERROR_INDEX_OUT_OF_RANGE;", "  }"]
    return lines


def _c_literal(value, dtype: str) -> str:
    if dtype.startswith("float"):
        if not math.isfinite(float(value)):  # float.hex gives 'inf' / 'nan', no C literal
            return "NAN" if math.isnan(float(value)) else ("-INFINITY" if value < 0 else "INFINITY")
        text = float(value).hex()
        return text + ("f" if dtype == "float32" else "")
    if dtype == "bool":
        return "1" if value else "0"
    suffix = {"int64": "LL", "uint64": "ULL", "uint32": "U"}.get(dtype, "")
    return f"{int(value)}{suffix}"


def _state_assembly(signature: StepSignature, state: dict, directory: str) -> str:
    """Each state tensor as a labelled blob: what the step never writes in .rodata (Flash), zero
    ones in .bss, the rest in .data (SRAM, copied from Flash at reset)."""
    lines = ["/* Generated by PockEngine: the step's state, included from state/*.bin. */", ".syntax unified"]
    constant = _constant_state(signature)
    for s in signature.state:
        value = np.ascontiguousarray(np.asarray(state[s.name], dtype=s.dtype).reshape(s.shape))
        symbol = state_symbol(s.name)
        if s.name in constant:
            section = f'.section .rodata.{symbol},"a"'
        elif not value.any():
            section = f'.section .bss.{symbol},"aw",%nobits'
        else:
            section = f'.section .data.{symbol},"aw"'
        lines += [section, ".balign 16", f".global {symbol}", f".type {symbol}, %object", f"{symbol}:"]
        if "nobits" in section:
            lines.append(f"  .space {max(1, value.nbytes)}")
        else:
            path = os.path.join("state", f"{symbol}.bin")
            _write(os.path.join(directory, path), value.tobytes())
            lines.append(f'  .incbin "{path}"')
        lines.append(f".size {symbol}, {max(1, value.nbytes)}")
    return "\n".join(lines) + "\n"


PE_TVM_H = """/* What TVM's generated C kernels expect from TVM's headers, declared here so the project builds
 * with a bare arm-none-eabi toolchain. */
#ifndef PE_TVM_H
#define PE_TVM_H
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <math.h>
#define TVM_DLL
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint, int dtype_bits_hint);
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr);
#endif
"""

WORKSPACE_C = """/* Fused kernels keep large intermediates in a workspace TVM's code asks for by call. Kernels run
 * one at a time and free in reverse order, so a static stack of the largest kernel's need serves
 * them all. */
static uint8_t pe_workspace[{bytes}] __attribute__((aligned(16)));
static size_t pe_workspace_top;
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {{
  (void)device_type; (void)device_id; (void)code; (void)bits;
  size_t size = (size_t)((nbytes + 15u) & ~(uint64_t)15u);
  if (pe_workspace_top + size > sizeof(pe_workspace)) return NULL;
  void* p = pe_workspace + pe_workspace_top;
  pe_workspace_top += size;
  return p;
}}
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {{
  (void)device_type; (void)device_id;
  pe_workspace_top = (size_t)((uint8_t*)ptr - pe_workspace);
  return 0;
}}
"""

HARNESS_C = r"""/* Test harness for QEMU (semihosting): run the step on the batches in batches.bin, print the
 * loss and the instructions executed per step (pe_train_step's, and the few of reading the counter),
 * write the trained state to state_out.bin. On a device, call pe_train_step from the application
 * instead. Usage (QEMU): -icount shift=0 -semihosting-config enable=on,target=native,arg=fw,arg=STEPS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pe_train_step.h"
#include "pe_batch.h"
#include "pe_counter.h"

static int semihost(int op, void* arg) {
  register int r0 __asm__("r0") = op;
  register void* r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

static int steps_from_command_line(void) {
  char line[128] = {0};
  struct { char* buffer; int length; } block = { line, sizeof(line) - 1 };
  if (semihost(0x15 /* SYS_GET_CMDLINE */, &block) != 0) return 1;
  char* last = strrchr(line, ' ');
  int steps = atoi(last ? last + 1 : line);
  return steps > 0 ? steps : 1;
}

int main(void) {
  int steps = steps_from_command_line();
  FILE* data = fopen("batches.bin", "rb");
  if (!data) { printf("error: cannot open batches.bin\n"); return 1; }
  pe_counter_start();
  for (int step = 1; step <= steps; ++step) {
    if (!PE_READ_BATCH(data)) {  /* at the end of the file: start over */
      rewind(data);
      if (!PE_READ_BATCH(data)) { printf("error: batches.bin is shorter than one batch\n"); return 1; }
    }
    float loss = 0.0f;
    uint64_t before = pe_counter_ticks();
    int status = pe_train_step(PE_BATCH_ARGS, &loss);
    uint64_t instructions = pe_ticks_to_instructions(pe_counter_ticks() - before);
    if (status != PE_OK) {  /* nothing was trained on it, and no state is written out */
      printf("error: step %d: code %d: %s\n", step, status, status == PE_ERROR_NON_FINITE_INPUT
             ? "an input holds NaN or an infinity (PyTorch's loss would be NaN)"
             : "a label or id is outside the range its operation accepts (PyTorch raises 'out of bounds')");
      fclose(data);
      return status;
    }
    printf("step %d loss %.9g instructions %llu\n", step, (double)loss, (unsigned long long)instructions);
  }
  fclose(data);
  FILE* out = fopen("state_out.bin", "wb");
  if (!out) { printf("error: cannot write state_out.bin\n"); return 1; }
  for (int i = 0; i < pe_mutable_state_count; ++i)
    fwrite(pe_mutable_state[i].data, 1, pe_mutable_state[i].bytes, out);
  fclose(out);
  printf("done\n");
  return 0;
}
"""

COUNTER_H = """/* The instructions the firmware executes, counted under QEMU (the harness reports them per step).
 * Under -icount shift=0 QEMU's virtual clock advances exactly 1 ns per instruction executed, and the
 * board clocks SysTick from it at the board's CPU clock, PE_QEMU_CPU_HZ (25 MHz on mps2, 32 MHz on
 * mps3): ticks x 1e9 / PE_QEMU_CPU_HZ are instructions, to one tick (40 instructions on mps2, 31.25
 * on mps3). QEMU implements no DWT (CYCCNT reads 0), and its semihosting clock counts centiseconds.
 * On a device SysTick counts cycles, not instructions. `make calibrate` checks the count. */
#ifndef PE_COUNTER_H
#define PE_COUNTER_H
#include <stdint.h>
void pe_counter_start(void);
uint64_t pe_counter_ticks(void);  /* since pe_counter_start; read twice around the code to count */
uint64_t pe_ticks_to_instructions(uint64_t ticks);  /* outside the code counted: a 64-bit division */
#endif
"""

COUNTER_C = """#include "pe_counter.h"
#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)
#define SYST_RELOAD 0xFFFFFFu  /* SysTick counts down 24 bits: 0.67 s at 25 MHz, so its interrupt counts the wraps */

static volatile uint32_t pe_counter_wraps;

void SysTick_Handler(void) { ++pe_counter_wraps; }

void pe_counter_start(void) {
  SYST_CSR = 0;
  SYST_RVR = SYST_RELOAD;
  SYST_CVR = 0;  /* the next tick loads SYST_RELOAD */
  pe_counter_wraps = 0;
  SYST_CSR = 7;  /* enabled, interrupt at 0, processor clock */
}

uint64_t pe_counter_ticks(void) {
  uint32_t wraps, value;
  /* The interrupt comes as the counter reaches 0, a few instructions into that tick: a 0 is
   * ambiguous (wrapped or not yet counted), and so is a wrap between the two reads. Both last
   * under a tick; read again. Before the first tick the counter reads 0 too. */
  do {
    wraps = pe_counter_wraps;
    value = SYST_CVR;
  } while (value == 0 || wraps != pe_counter_wraps);
  return (uint64_t)wraps * (SYST_RELOAD + 1u) + (SYST_RELOAD - value);
}

uint64_t pe_ticks_to_instructions(uint64_t ticks) {
  return (ticks * 1000000000ull + PE_QEMU_CPU_HZ / 2) / PE_QEMU_CPU_HZ;
}
"""

CALIBRATE_C = """/* `make calibrate`: the instruction counter (pe_counter.c) on loops of known length. A loop of n
 * iterations executes 2 + 30 n instructions: a compare and a branch, then per iteration seven
 * times an integer add, a load, a float add and a nop (what is counted must not depend on the kind
 * of instruction), a decrement and a branch back. The last loop outlasts SysTick's 24 bits. */
#include <stdio.h>
#include "pe_counter.h"

static inline __attribute__((always_inline)) void loop(uint32_t iterations) {
  uint32_t sum = 0, loaded;
  __asm__ volatile("cmp %0, #0\\n beq 2f\\n"
                   "1:\\n .rept 7\\n adds %1, %1, #1\\n ldr %2, [sp]\\n vadd.f32 s15, s15, s15\\n nop\\n .endr\\n"
                   "subs %0, %0, #1\\n bne 1b\\n 2:"
                   : "+r"(iterations), "+r"(sum), "=&r"(loaded) : : "s15", "cc", "memory");
}

#define MEASURE(n) do { \\
    uint64_t before = pe_counter_ticks(); \\
    loop(n); \\
    uint64_t counted = pe_ticks_to_instructions(pe_counter_ticks() - before); \\
    printf("loop %lu expected %llu counted %llu\\n", (unsigned long)(n), 2ull + 30ull * (n), \\
           (unsigned long long)counted); \\
  } while (0)

int main(void) {
  pe_counter_start();
  MEASURE(0u);
  MEASURE(1u);
  MEASURE(1000u);
  MEASURE(1000000u);
  MEASURE(25000000u);
  return 0;
}
"""

STARTUP_C = r"""/* Reset handler for the QEMU boards: copy .data, zero .bss, enable the FPU, run main. */
#include <stdint.h>
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);
extern void exit(int);
void Reset_Handler(void);
void Default_Handler(void) { for (;;) {} }
void SysTick_Handler(void) __attribute__((weak, alias("Default_Handler")));  /* pe_counter.c's, when linked */
__attribute__((section(".isr_vector"), used))
const void* pe_vectors[16] = { &_estack, Reset_Handler, Default_Handler, Default_Handler, Default_Handler,
  Default_Handler, Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler, SysTick_Handler };
void Reset_Handler(void) {
  uint32_t *src = &_sidata, *dst = &_sdata;
  while (dst < &_edata) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
#if defined(__ARM_FP)
  *(volatile uint32_t*)0xE000ED88 |= (0xFu << 20);  /* CPACR: CP10/CP11 full access */
  __asm__ volatile("dsb; isb");
#endif
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}
void _init(void) {}  /* -nostartfiles drops crti/crtn; __libc_init_array still calls these */
void _fini(void) {}
"""

LINK_LD = """/* Memory of the QEMU board standing in for the device (PockEngine checks the device's own limits). */
MEMORY {{ FLASH (rx) : ORIGIN = {flash_origin:#x}, LENGTH = {flash_bytes}
         RAM (rwx)  : ORIGIN = {sram_origin:#x}, LENGTH = {sram_bytes}{rom} }}
ENTRY(Reset_Handler)
_estack = ORIGIN(RAM) + LENGTH(RAM);
_stack_bytes = {stack};
SECTIONS {{
  .text : {{ KEEP(*(.isr_vector)) *(.text*){text_rodata}
            . = ALIGN(4); KEEP(*(.init)) KEEP(*(.fini))
            __preinit_array_start = .; KEEP(*(.preinit_array)) __preinit_array_end = .;
            __init_array_start = .; KEEP(*(.init_array*)) __init_array_end = .;
            __fini_array_start = .; KEEP(*(.fini_array*)) __fini_array_end = .; }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
{rodata_section}  _sidata = LOADADDR(.data);
  .data : {{ _sdata = .; *(.data*) . = ALIGN(4); _edata = .; }} > RAM AT > {load}
  .bss (NOLOAD) : {{ _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; }} > RAM
  . = ALIGN(8); end = .; _end = .; __end__ = .;
  ASSERT(_ebss + _stack_bytes <= _estack, "the step's state, arena and stack do not fit the board's RAM")
}}
"""

MAKEFILE = """# Generated by PockEngine. `make` builds firmware.elf, `make run STEPS=N` trains N steps under QEMU.
CC      = arm-none-eabi-gcc
SIZE    ?= arm-none-eabi-size
QEMU    ?= qemu-system-arm
STEPS   ?= 3
CFLAGS  := {cflags} -mthumb -O2 -ffunction-sections -fdata-sections -fstack-usage -Wall -Wno-unused-variable -Wno-unused-function -DPE_QEMU_CPU_HZ={cpu_hz}
SOURCES := kernels.c pe_train_step.c harness.c pe_counter.c startup.c
OBJECTS := $(SOURCES:.c=.o) pe_state.o
LDFLAGS := --specs=rdimon.specs -nostartfiles -Wl,--gc-sections
# -icount shift=0: the virtual clock advances 1 ns per instruction, so the harness counts instructions (pe_counter.h)
QEMUFLAGS := -M {machine} -icount shift=0 -nographic -monitor none -serial none
SEMIHOSTING := enable=on,target=native

.PHONY: all run calibrate size measure clean
all: firmware.elf

%.o: %.c pe_tvm.h pe_train_step.h kernels.h pe_batch.h pe_counter.h
\t$(CC) $(CFLAGS) -c $< -o $@

pe_state.o: pe_state.S $(wildcard state/*.bin)
\t$(CC) $(CFLAGS) -c $< -o $@

firmware.elf: $(OBJECTS) link.ld
\t$(CC) $(CFLAGS) $(LDFLAGS) -Wl,-Map=firmware.map -T link.ld $(OBJECTS) -lm -o $@

# Too big for the board? `make measure` links it anyway, into memory of any size, to read its sizes.
measure: firmware-measure.elf
firmware-measure.elf: $(OBJECTS) measure.ld
\t$(CC) $(CFLAGS) $(LDFLAGS) -T measure.ld $(OBJECTS) -lm -o $@

run: firmware.elf batches.bin
\t$(QEMU) $(QEMUFLAGS) -semihosting-config $(SEMIHOSTING),arg=firmware,arg=$(STEPS) -kernel firmware.elf

# The instruction counter on loops of known length: expected and counted instructions per loop.
calibrate: calibrate.elf
\t$(QEMU) $(QEMUFLAGS) -semihosting-config $(SEMIHOSTING) -kernel calibrate.elf
calibrate.elf: calibrate.o pe_counter.o startup.o link.ld
\t$(CC) $(CFLAGS) $(LDFLAGS) -T link.ld calibrate.o pe_counter.o startup.o -o $@

size: firmware.elf
\t$(SIZE) -A firmware.elf

clean:
\trm -f *.o *.su firmware.elf firmware-measure.elf calibrate.elf firmware.map state_out.bin
"""
