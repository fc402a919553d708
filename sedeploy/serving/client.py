"""``sedeploy infer IMAGE… --url URL``: images → sedeploy's preprocessing → a Triton server → top-k labels.

The client asks the server for the model's configuration: input/output names, size and ``max_batch_size`` come
from it, and so does the preprocessing (the ``sedeploy.preprocess`` parameter that ``sedeploy package --triton``
and ``sedeploy serve`` put there; without it, mmcls's pipeline at the input size). Works with any Triton that
serves the model: ``sedeploy serve`` here, or the model repository in the Triton container.

Class names: a ``--labels-file`` (Caffe ``synset_words.txt``: ``n01440764 tench, Tinca tinca`` per line, the
``index<TAB>synset<TAB>name…`` table, or one name per line; read by :func:`sedeploy.classes.read_class_names`,
as bench and package read it), else ``$SEDEPLOY_LABELS``; a file given either way must name exactly the model's
classes (or, for a model with a label offset, the dataset's classes: outputs below the offset are ``background``).
Without one, classes are shown as output indices.

Probabilities: the model's ``sedeploy.output_kind`` parameter says whether its output already is probabilities (a
Softmax ends many third-party graphs: used as they are) or logits (softmax taken here); its
``sedeploy.label_offset`` says which output is dataset class 0.
"""
from __future__ import annotations

import http.client
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.classes import read_class_names
from sedeploy.errors import SedeployError
from sedeploy.metrics import as_logits
from sedeploy.onnxcore import input_layout, pad_to_batch
from sedeploy.preprocess import layout_batch, load_image, recorded_preprocess
from sedeploy.serving.env import require_client

log = logging.getLogger("sedeploy")

def _host(url: str) -> str:
    """tritonclient takes host:port; accept http://host:port too."""
    for prefix in ("http://", "https://"):
        if url.startswith(prefix):
            return url[len(prefix):].rstrip("/")
    return url.rstrip("/")


def check_http(url: str, timeout_s: float = 10.0) -> None:
    """Something at ``url`` answers Triton's HTTP health endpoint; else one error saying what answers instead
    (nothing, or not HTTP: the gRPC port) and how to fix the URL."""
    host, _, port = _host(url).rpartition(":")
    if not host or not port.isdigit():
        raise SedeployError(f"--url {url!r} is not host:port.", expected="e.g. 127.0.0.1:8000 or http://host:8000")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    try:
        conn.request("GET", "/v2/health/live")
        status = conn.getresponse().status
    except http.client.HTTPException as err:  # bytes came back, but not an HTTP response
        raise SedeployError(f"The server at {url} does not speak HTTP ({type(err).__name__}): is it the gRPC or "
                            "another port?", expected="Triton's HTTP port (`sedeploy serve --port`, default 8000)",
                            fix="pass --url HOST:HTTP_PORT (`sedeploy serve` prints it)") from None
    except OSError as err:
        raise SedeployError(f"No Triton server answers at {url} ({err.strerror or err}).",
                            fix="start one with `sedeploy serve ENGINES_DIR`, or pass the right --url") from None
    finally:
        conn.close()
    if status != 200:
        raise SedeployError(f"The server at {url} answers HTTP {status} to /v2/health/live: not a live Triton server.",
                            fix="pass the URL of a Triton server's HTTP port, or check that server's log")


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


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def request_batches(x: np.ndarray, max_batch: int, dims: Sequence[int]):
    """The requests that carry the batch ``x`` to a model of ``max_batch_size`` ``max_batch`` and input ``dims``
    (Triton's: without the batch when max_batch > 0, the whole shape when 0): (array to send, rows that are
    images). A fixed-batch model (max_batch 0, dims[0] = B > 0) takes exactly B images per request: the last one is
    padded (:func:`sedeploy.onnxcore.pad_to_batch`) and the padding's rows are dropped from its output."""
    fixed = int(dims[0]) if max_batch <= 0 and len(dims) == 4 and int(dims[0]) > 0 else None
    chunk = max_batch if max_batch > 0 else fixed or len(x)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        yield np.ascontiguousarray(pad_to_batch(part, fixed)), len(part)


def probabilities(y: np.ndarray, kind: str) -> np.ndarray:
    """Class probabilities from a model's output of kind ``kind`` (:func:`sedeploy.onnxcore.output_kind`):
    probabilities as they are (normalised), logits and log-probabilities through a softmax."""
    z = as_logits(y, kind)
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    return prob / prob.sum(axis=1, keepdims=True)


def class_names(names: Sequence[str], classes: int, offset: int, where: str) -> list[str]:
    """One name per model output from a class-name table: it names every output, or (label offset > 0) the dataset's
    classes, output k being class k − offset and outputs below the offset ``background``."""
    if not names:
        return []
    if len(names) == classes:
        return list(names)
    if offset and len(names) == classes - offset:
        return ["background"] * offset + list(names)
    want = f"{classes}" + (f" or {classes - offset} (label offset {offset})" if offset else "")
    raise SedeployError(f"The labels file '{where}' names {len(names)} classes; the model has {classes} outputs.",
                        expected=f"{want} names",
                        fix="pass the class-name table of this model (one name per class, in index order), "
                            "or leave --labels-file (and $SEDEPLOY_LABELS) out to see class indices")


def infer_images(paths: Sequence[str | os.PathLike], url: str, model: str | None = None, *, top_k: int = 5,
                 labels_file: str | os.PathLike | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Top-k classes of each image from a Triton server (HTTP). Returns {model, url, results: [{image, top: [{index,
    label, probability, logit}]}], logits (N×classes list)}."""
    require_client("sedeploy infer")
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    if not paths:
        raise SedeployError("No image given.", fix="sedeploy infer photo.jpg --url 127.0.0.1:8000")
    if top_k < 1:
        raise SedeployError(f"--top-k {top_k} is not valid.", expected="a positive integer")
    given = labels_file if labels_file is not None else os.environ.get("SEDEPLOY_LABELS") or None
    names = read_class_names(given) if given else []  # read first: a wrong file fails before any request
    check_http(url, timeout_s)
    client = th.InferenceServerClient(_host(url), connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        model, cfg = _model_info(client, model, url)
        inp, out = cfg["input"][0], cfg["output"][0]
        max_batch = int(cfg.get("max_batch_size", 0))
        dims = [int(d) for d in inp["dims"]]
        layout = input_layout(([-1] if len(dims) == 3 else []) + dims) or "NCHW"  # NHWC engines: channels last
        h, w = (dims[-2], dims[-1]) if layout == "NCHW" else (dims[-3], dims[-2])
        params = _parameters(cfg)
        pp = recorded_preprocess(params.get("sedeploy.preprocess") or None, (h, w), name=f"model {model!r}")
        arrays = []
        for p in map(Path, paths):
            try:
                arrays.append(load_image(p, pp))
            except (OSError, ValueError, SyntaxError) as err:
                raise SedeployError(f"The image '{p}' cannot be read ({type(err).__name__}: {err}).",
                                    fix="pass JPEG/PNG files") from err
        x = layout_batch(np.stack(arrays), layout)
        logits = []
        for part, rows in request_batches(x, max_batch, dims):
            ti = th.InferInput(inp["name"], list(part.shape), "FP32")
            ti.set_data_from_numpy(part)
            try:
                res = client.infer(model, [ti], outputs=[th.InferRequestedOutput(out["name"])])
            except InferenceServerException as err:
                raise SedeployError(f"The server refused the request for model {model!r}: {err.message()}",
                                    fix="check that the model takes N×3×H×W float32 images") from err
            logits.append(res.as_numpy(out["name"])[:rows])
    finally:
        client.close()
    y = np.concatenate(logits).astype(np.float64)
    kind = params.get("sedeploy.output_kind") or "logits"
    try:
        offset = int(params.get("sedeploy.label_offset") or 0)
    except ValueError:
        offset = 0
        log.warning("Model %s has an unreadable sedeploy.label_offset %r; using 0.", model,
                    params.get("sedeploy.label_offset"))
    names = class_names(names, y.shape[1], offset, str(given))
    prob = probabilities(y, kind)
    results = []
    for p, row, pr in zip(paths, y, prob):
        idx = np.argsort(-pr, kind="stable")[:top_k]
        results.append({"image": str(p), "top": [{"index": int(k), "class": int(k) - offset if k >= offset else None,
                                                   "label": names[k] if names else str(int(k)),
                                                   "probability": float(pr[k]), "logit": float(row[k])}
                                                  for k in idx]})
    return {"model": model, "url": url, "labels": str(given) if names else None, "output_kind": kind,
            "label_offset": offset, "results": results, "logits": y.tolist()}


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
