"""Serving benchmark: throughput and p99 latency vs concurrency, Triton's dynamic batcher on and off.

Two real tritonservers (PyTriton, ``sedeploy.serving.server.running_server``) serve the same engine on
127.0.0.1 — one with the dynamic batcher, one with batching off (every request runs alone). Closed-loop clients
(each sends its next single-image request when the previous answer arrives, over HTTP with tritonclient) run
bursts at concurrency 1, 4 and 16; the two servers' bursts alternate in every round, so both sides see the same
machine load. The timer covers one client request: serialisation, HTTP, Triton's queue, the engine call, the
answer. Only one server is under load at a time.

    PYTHONPATH=. python benchmarks/serving.py ENGINES_DIR [--engine NAME] [--rounds 2] [--burst-s 8]

Needs ``pip install 'sedeploy[serve]'`` (numpy < 2). Writes benchmarks/results/serving/{results.json, results.md,
serving.png}. The machine may be shared: the load average is recorded before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "serving"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def burst(served, concurrency: int, seconds: float, x: np.ndarray) -> dict:
    """Closed-loop clients for ``seconds``; returns per-request latencies and errors."""
    import tritonclient.http as th

    lat, errors = [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        client = th.InferenceServerClient(served.http_url.removeprefix("http://"), network_timeout=120)
        i = k
        try:
            while time.perf_counter() < stop_at:
                inp = th.InferInput(served.input_name, [1, *x.shape[1:]], "FP32")
                inp.set_data_from_numpy(x[i % len(x)][None])
                t0 = time.perf_counter()
                try:
                    y = client.infer(served.name, [inp]).as_numpy(served.output_name)
                    ok = y is not None and y.shape[0] == 1
                except Exception as err:  # every failure is counted and reported
                    ok, y = False, repr(err)
                dt = time.perf_counter() - t0
                with lock:
                    (lat.append(dt) if ok else errors.append(str(y)[:200]))
                i += concurrency
        finally:
            client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return {"latencies_s": lat, "errors": errors, "wall_s": time.perf_counter() - t0}




def summarize(samples: list[dict]) -> dict:
    lat = np.asarray([v for s in samples for v in s["latencies_s"]]) * 1000
    wall = sum(s["wall_s"] for s in samples)
    per_burst = [len(s["latencies_s"]) / s["wall_s"] for s in samples if s["wall_s"] > 0]
    return {"requests": int(lat.size), "errors": sum(len(s["errors"]) for s in samples),
            "error_examples": [e for s in samples for e in s["errors"]][:3],
            "throughput_img_s": lat.size / wall if wall else None,
            "throughput_per_burst": per_burst,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p90_ms": float(np.percentile(lat, 90)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("sedeploy", "nvidia-pytriton", "tritonclient", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("dynamic batching", "o-"), ("batching off", "s--")):
        rows = [r for r in res["rows"] if r["mode"] == mode]
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["throughput_img_s"] for r in rows], style, label=mode)
        b.plot(c, [r["p99_ms"] for r in rows], style, label=mode)
    for ax, title in ((a, "throughput (img/s, higher is better)"), (b, "p99 latency (ms, lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrent clients (1 image per request)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend()
    la = res["load_average_before"]
    fig.suptitle(f"{res['engine']} on tritonserver (PyTriton), {res['machine']['cpus_usable']} CPUs, "
                 f"load avg {la[0]:.1f} (shared machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res: dict) -> str:
    lines = [f"# Serving: {res['engine']} on tritonserver (PyTriton), dynamic batching on vs off", "",
             f"Command: `{res['command']}`  ", f"Created: {res['created']}  ",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cpus_usable']} usable CPUs; load average before "
             f"{res['load_average_before']}, after {res['load_average_after']} (a shared machine: other jobs ran).  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}  ",
             f"Server: dynamic batcher max_batch_size {res['served']['dynamic batching']['max_batch_size']}, "
             f"preferred {res['served']['dynamic batching']['preferred']}, queue delay "
             f"{res['served']['dynamic batching']['queue_delay_us']} µs; engine threads {res['threads']}.  ",
             f"Timer: {res['timer']}", "",
             "| concurrency | mode | img/s | p50 ms | p99 ms | mean batch formed | requests | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['concurrency']} | {r['mode']} | {r['throughput_img_s']:.1f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['mean_batch']:.2f} | {r['requests']} | {r['errors']} |")
    lines += ["", "Ratios (dynamic / off, same run, bursts interleaved):", ""]
    for c in res["concurrency"]:
        on = next(r for r in res["rows"] if r["concurrency"] == c and r["mode"] == "dynamic batching")
        off = next(r for r in res["rows"] if r["concurrency"] == c and r["mode"] == "batching off")
        lines.append(f"- concurrency {c}: throughput ×{on['throughput_img_s'] / off['throughput_img_s']:.2f}, "
                     f"p99 ×{on['p99_ms'] / off['p99_ms']:.2f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines_dir")
    ap.add_argument("--engine", help="model name or engine file [default: the first FP32 engine]")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--burst-s", type=float, default=8.0)
    ap.add_argument("--queue-delay-us", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--replot", action="store_true", help="only redraw results.md and the plot from results.json")
    a = ap.parse_args(argv)
    if a.replot:
        res = json.loads((Path(a.out) / "results.json").read_text())
        (Path(a.out) / "results.md").write_text(table(res))
        plot(res, Path(a.out) / "serving.png")
        return 0
    from sedeploy.serving.client import batch_stats
    from sedeploy.serving.server import ServeOptions, running_server

    conc = [int(c) for c in a.concurrency.split(",")]
    load_before = list(os.getloadavg())
    samples: dict[tuple[str, int], list] = {}
    served_info, batches = {}, {}
    with running_server(a.engines_dir, a.engine, _opts(ServeOptions, True, a)) as on, \
            running_server(a.engines_dir, a.engine, _opts(ServeOptions, False, a)) as off:
        servers = {"dynamic batching": on, "batching off": off}
        size = on.input_shape[-1]
        x = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
        for mode, s in servers.items():  # warm-up, untimed
            burst(s, 2, 2.0, x)
            served_info[mode] = s.as_dict()
        for rnd in range(a.rounds):
            for c in conc:
                for mode, s in (servers.items() if rnd % 2 == 0 else reversed(servers.items())):
                    b0 = batch_stats(s.metrics_url, s.name)
                    r = burst(s, c, a.burst_s, x)
                    b1 = batch_stats(s.metrics_url, s.name)
                    samples.setdefault((mode, c), []).append(r)
                    inf, ex = batches.get((mode, c), (0.0, 0.0))
                    batches[(mode, c)] = (inf + b1[0] - b0[0], ex + b1[1] - b0[1])
                    print(f"round {rnd} c={c:<2} {mode:<16} {len(r['latencies_s']) / r['wall_s']:7.1f} img/s "
                          f"errors {len(r['errors'])}", file=sys.stderr)
        engine = on.engine.name
    rows = []
    for c in conc:
        for mode in ("dynamic batching", "batching off"):
            st = summarize(samples[(mode, c)])
            inf, ex = batches[(mode, c)]
            rows.append({"concurrency": c, "mode": mode, "mean_batch": inf / ex if ex else None, **st})
    res = {"schema": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": "PYTHONPATH=. python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "engine": engine, "machine": machine(), "versions": versions(), "threads": a.threads or "default",
           "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
           "concurrency": conc, "rounds": a.rounds, "burst_s": a.burst_s,
           "timer": "one client request, closed loop: tritonclient HTTP serialisation → Triton queue (+ dynamic "
                    "batcher) → engine → answer; single-image requests",
           "served": {m: {k: v for k, v in d.items() if k in ("name", "max_batch_size", "preferred",
                                                                "queue_delay_us", "batching_rule")}
                      for m, d in served_info.items()},
           "rows": [{k: v for k, v in r.items()} for r in rows]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(table(res))
    plot(res, out / "serving.png")
    print(table(res))
    return 0


def _opts(cls, batching: bool, a):
    ports = free_ports(3)
    return cls(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], batching=batching,
               queue_delay_us=a.queue_delay_us, threads=a.threads, exit_timeout_s=5)


if __name__ == "__main__":
    sys.exit(main())
