"""Passes over the training step, one per file; each `name(...)` returns a `tvm.transform.Pass`.
Analyses that read a step without rewriting it (memory_plan) live here too."""
