"""gptfast's benchmark harness: timing (``harness``), where it ran (``environment``),
result rows (``results``), running cases within a budget (``runner``), the suites
(``suites``), issue targets (``targets``), presenting results (``report``), telling a
sticky CUDA error (``cuda_errors``), and the GPU suite's Triton warm-up (``warm``) and
summary (``suite_summary``).

Importing this package imports neither triton nor any kernel.
"""
