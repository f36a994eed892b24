"""NVIDIA GPU target: the whole training step as CUDA kernels, built (PTX included) on a machine
without a GPU.

    step_mod --pipeline.lower with family.LOWERING--> memory-planned Relax module, every kernel bound
             to GPU threads (schedules.py: tuning records, else dlight)
             --kernel_check.gpu_kernels_check--> TargetError naming any kernel that would run on the host CPU
             --nvcc.build_cuda--> (VM executable with the kernels compiled by nvcc, PTX for the arch)
             --nvcc.export_cuda--> train_step.so (cross-compiled for the target's host) + kernels.ptx

device.py: the target and the machine (the stand-in driver of a GPU-less build host, whether a GPU
is here); family.py: the family (build, run, reports).

Kernels get their schedule in this order: a MetaSchedule record (tuning logs) if one matches, else
the first of TVM's dlight GPU rules that applies. The CPU schedule passes (inline_elementwise,
schedule_cpu, fast_math) are NOT used: dlight only recognises unscheduled kernels, and a kernel
scheduled for CPU cores has no thread binding.

Why a check at all: TVM 0.27 compiles a PrimFunc with no blockIdx/threadIdx binding for the *host*
CPU of a CUDA target, without a warning (measured: the MLP step built without dlight gives a
"successful" build with 2 CUDA kernels and 44 host loops). A step that quietly runs its gradients on
the Jetson's ARM cores would still train, only far slower, so any such kernel is an error.

Targets: the Jetson Orin preset (sm_87 GPU, Cortex-A78 host) or any TVM cuda target with an
explicit `arch` (there is no GPU here to detect one); a cuda target without a host gets an LLVM
host for this machine.
"""
