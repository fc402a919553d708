"""``sedeploy infer IMAGE… --url URL``: images → sedeploy's preprocessing → a Triton server → top-k labels.

The client asks the server for the model's configuration: input/output names, size and ``max_batch_size`` come
from it, and so does the preprocessing (the ``sedeploy.preprocess`` parameter that ``sedeploy package --triton``
and ``sedeploy serve`` put there; without it, mmcls's pipeline at the input size). Works with any Triton that
serves the model: ``sedeploy serve`` here, or the model repository in the Triton container.

Class names: a ``--labels-file`` (Caffe ``synset_words.txt``: ``n01440764 tench, Tinca tinca`` per line, or the
``index<TAB>synset<TAB>name…`` table), else ``$SEDEPLOY_LABELS``, else ``../shared/data/labels`` beside a source
checkout when present; otherwise classes are shown as indices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.errors import SedeployError

LABEL_FILES = ("synset_words.txt", "imagenet1k_index_synset_name.tsv")


def _host(url: str) -> str:
    """tritonclient takes host:port; accept http://host:port too."""
    for prefix in ("http://", "https://"):
        if url.startswith(prefix):
            return url[len(prefix):].rstrip("/")
    return url.rstrip("/")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Names in index order from ``synset_words.txt`` or the ``index<TAB>synset<TAB>name`` table."""
    p = Path(path)
    if not p.is_file():
        raise SedeployError(f"The labels file '{p}' does not exist.",
                            expected="synset_words.txt ('n01440764 tench, Tinca tinca' per line)")
    names = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if "\t" in line:
            fields = line.split("\t")
            if not fields[0].strip().isdigit():
                continue  # header
            names.append(fields[2].strip() if len(fields) > 2 else fields[-1].strip())
        else:
            parts = line.split(None, 1)
            names.append(parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0])
    return names


def default_labels_file() -> Path | None:
    env = os.environ.get("SEDEPLOY_LABELS")
    if env:
        return Path(env)
    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "labels"
    for name in LABEL_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _model_info(client, model: str | None, url: str) -> tuple[str, dict[str, Any]]:
    from tritonclient.utils import InferenceServerException

    try:
        if model is None:
            try:
                index = client.get_model_repository_index()
            except InferenceServerException as err:
                raise SedeployError(f"The server at {url} does not list its models"
                                    f" ({err.message()}).",
                                    fix="pass --model NAME (`sedeploy serve` prints the name it serves)") from err
            ready = [m["name"] for m in index if m.get("state") == "READY"]
            if len(ready) != 1:
                raise SedeployError(f"The server serves {len(ready)} ready models ({', '.join(ready) or 'none'}).",
                                    fix="pass --model NAME")
            model = ready[0]
        return model, client.get_model_config(model)
    except InferenceServerException as err:
        raise SedeployError(f"The server cannot describe model {model!r}: {err.message()}",
                            fix="check --model (GET /v2/models/<name>/config) and --url") from err


def _preprocess(config: dict[str, Any], height: int):
    from sedeploy.preprocess import Preprocess

    stored = ((config.get("parameters") or {}).get("sedeploy.preprocess") or {}).get("string_value")
    if stored:
        d = json.loads(stored)
        return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    return Preprocess.for_size(height)


def infer_images(paths: Sequence[str | os.PathLike], url: str, model: str | None = None, *, top_k: int = 5,
                 labels_file: str | os.PathLike | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Top-k classes of each image from a Triton server (HTTP). Returns {model, url, results: [{image, top: [{index,
    label, probability, logit}]}], logits (N×classes list)}."""
    from sedeploy.preprocess import load_image
    from sedeploy.serving.env import require_client

    require_client("sedeploy infer")
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    if not paths:
        raise SedeployError("No image given.", fix="sedeploy infer photo.jpg --url 127.0.0.1:8000")
    if top_k < 1:
        raise SedeployError(f"--top-k {top_k} is not valid.", expected="a positive integer")
    try:
        client = th.InferenceServerClient(_host(url), connection_timeout=timeout_s, network_timeout=timeout_s)
        live = client.is_server_live()
    except (InferenceServerException, OSError) as err:
        raise SedeployError(f"No Triton server answers at {url} ({err}).",
                            fix="start one with `sedeploy serve ENGINES_DIR`, or pass the right --url") from err
    try:
        if not live:
            raise SedeployError(f"The Triton server at {url} is not live.", fix="check its log")
        model, cfg = _model_info(client, model, url)
        inp, out = cfg["input"][0], cfg["output"][0]
        max_batch = int(cfg.get("max_batch_size", 0))
        dims = [int(d) for d in inp["dims"]]
        hw = dims[-2]
        pp = _preprocess(cfg, hw)
        arrays = []
        for p in map(Path, paths):
            try:
                arrays.append(load_image(p, pp))
            except (OSError, ValueError, SyntaxError) as err:
                raise SedeployError(f"The image '{p}' cannot be read ({type(err).__name__}: {err}).",
                                    fix="pass JPEG/PNG files") from err
        x = np.stack(arrays)
        chunk = max_batch if max_batch > 0 else len(x)
        logits = []
        for i in range(0, len(x), chunk):
            part = x[i:i + chunk]
            ti = th.InferInput(inp["name"], list(part.shape), "FP32")
            ti.set_data_from_numpy(part)
            try:
                res = client.infer(model, [ti], outputs=[th.InferRequestedOutput(out["name"])])
            except InferenceServerException as err:
                raise SedeployError(f"The server refused the request for model {model!r}: {err.message()}",
                                    fix="check that the model takes N×3×H×W float32 images") from err
            logits.append(res.as_numpy(out["name"]))
    finally:
        client.close()
    y = np.concatenate(logits).astype(np.float64)
    lf = Path(labels_file) if labels_file else default_labels_file()
    names = read_class_names(lf) if lf is not None else []
    if len(names) != y.shape[1]:
        names = []  # a table for another number of classes says nothing about this model
    prob = np.exp(y - y.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    results = []
    for p, row, pr in zip(paths, y, prob):
        idx = np.argsort(-row, kind="stable")[:top_k]
        results.append({"image": str(p), "top": [{"index": int(k), "label": names[k] if names else str(int(k)),
                                                   "probability": float(pr[k]), "logit": float(row[k])}
                                                  for k in idx]})
    return {"model": model, "url": url, "labels": str(lf) if names else None, "results": results,
            "logits": y.tolist()}


def batch_stats(metrics_url: str, model: str) -> tuple[float, float]:
    """(inferences, executions) of ``model`` from Triton's Prometheus metrics: their ratio is the mean batch size
    the dynamic batcher formed."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(key + "{") and f'model="{model}"' in line:
                vals[key] = float(line.rsplit(None, 1)[1])
    return vals.get("nv_inference_count", 0.0), vals.get("nv_inference_exec_count", 0.0)


def format_infer(res: dict[str, Any]) -> str:
    lines = [f"model {res['model']} at {res['url']}"]
    for r in res["results"]:
        lines.append(r["image"])
        for t in r["top"]:
            lines.append(f"  {t['probability'] * 100:6.2f}%  {t['index']:>4}  {t['label']}")
    return "\n".join(lines)
