"""``sedeploy bench``: throughput, latency and top-1 drift of deployment engines, against FLOPs.

The pieces are independent so each can be tested on its own and reused:

- :mod:`~sedeploy.bench.probe` — this machine's fp32 / int8 GEMM ceiling;
- :mod:`~sedeploy.bench.accuracy` — agreement, flips, KL against the FP32 reference; the CI budget gate;
- :mod:`~sedeploy.bench.report` — the results dict and its files (JSON / CSV / markdown / PNG);
- :mod:`~sedeploy.bench.tables` — the terminal table, results.md and CSV rows; :mod:`~sedeploy.bench.plots` — the plots.

What the build shares with it lives below: interleaved timing in :mod:`sedeploy.backends.timing`, ground truth
for an image folder in :mod:`sedeploy.labels` (class tables in :mod:`sedeploy.classes`), the figures in
:mod:`sedeploy.metrics`.

Only numpy is imported here; torch, onnxruntime and matplotlib load inside the functions that use them.
"""
from sedeploy.bench.accuracy import check_budget, compare_engines, engine_accuracy
from sedeploy.bench.probe import machine_ceilings
from sedeploy.bench.report import EngineInfo, assemble_results, machine_description, write_reports
from sedeploy.bench.tables import format_table

__all__ = ["machine_ceilings", "engine_accuracy", "compare_engines", "check_budget", "EngineInfo",
           "assemble_results", "format_table", "machine_description", "write_reports"]
