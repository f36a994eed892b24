"""Analyses of a training step that change nothing: its planned memory, its memory over time, its FLOPs.

Passes (pockengine/passes) transform the step; these read it. They sit above the passes: an analysis
may ask a pass how it shapes a kernel (inline_elementwise's intermediate buffers), a pass never reads
a report.
"""
