"""``sedeploy bench``: throughput, latency and top-1 drift of deployment engines, against FLOPs.

The pieces are independent so each can be tested on its own and reused:

- :mod:`~sedeploy.bench.timing` — interleaved timing of any objects with ``infer(x) -> logits`` (the runner protocol of :mod:`sedeploy.backends`);
- :mod:`~sedeploy.bench.probe` — this machine's fp32 / int8 GEMM ceiling;
- :mod:`~sedeploy.bench.labels` — ground truth for an image folder (synset / index folders, labels files);
- :mod:`~sedeploy.bench.accuracy` — agreement, flips, KL against the FP32 reference; the CI budget gate;
- :mod:`~sedeploy.bench.report` — the results dict, terminal table, JSON / CSV / markdown / PNG files.

Only numpy is imported here; torch, onnxruntime and matplotlib load inside the functions that use them.
"""
from sedeploy.bench.accuracy import check_budget, compare_engines, engine_accuracy
from sedeploy.bench.labels import IMAGENET_SYNSETS, Labels, read_synset_table, resolve_labels
from sedeploy.bench.probe import machine_ceilings
from sedeploy.bench.report import EngineInfo, assemble_results, format_table, machine_description, write_reports
from sedeploy.bench.timing import TimingResult, latency_stats, time_runners

__all__ = ["time_runners", "TimingResult", "latency_stats", "machine_ceilings", "IMAGENET_SYNSETS", "Labels",
           "read_synset_table", "resolve_labels", "engine_accuracy", "compare_engines", "check_budget",
           "EngineInfo", "assemble_results", "format_table", "machine_description", "write_reports"]
