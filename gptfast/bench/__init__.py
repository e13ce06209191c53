"""gptfast's benchmark harness: timing (``harness``), where it ran (``environment``),
result rows (``results``), running cases within a budget (``runner``), the suites
(``suites``), issue targets (``targets``) and presenting results (``report``).

Importing this package imports neither triton nor any kernel.
"""
