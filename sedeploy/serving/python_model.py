"""The Triton python-backend model that ``sedeploy serve`` runs: one sedeploy engine inside Triton's python stub.

``sedeploy serve`` copies this file as ``<model>/1/model.py`` of the model repository it hands to ``tritonserver``.
Triton's python backend loads it in its stub process, calls :meth:`TritonPythonModel.execute` with the requests its
dynamic batcher grouped, and sends back one response per request.

Every request is checked on its own **before** the batch runs (:func:`request_error`: element type, C×H×W,
batch size, finite values). A bad request gets its own ``INVALID_ARG`` error (HTTP 400, gRPC INVALID_ARGUMENT)
saying what is wrong with it, without a traceback or server paths; the good requests batched with it are run
together and succeed. An engine failure (a bug, not the request) fails only the batch it hit, with one line.

The engine and how to run it come from the model's ``parameters`` (``sedeploy.engine``, ``sedeploy.threads``);
``triton_python_backend_utils`` exists only inside Triton's stub, so it is imported there, in the methods.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import numpy as np

from sedeploy.backends import open_runner

log = logging.getLogger("sedeploy")


def request_error(x: np.ndarray, *, name: str, item_shape: Sequence[int], max_batch: int) -> str | None:
    """Why the input ``x`` of one request cannot be served, or None when it can.

    ``item_shape``: C, H, W (a -1 takes any size); ``max_batch``: the largest batch one request may carry (0: no
    limit beyond what the model's shape says)."""
    want = "x".join(str(d) for d in item_shape)
    if x.dtype != np.float32:
        return f"input '{name}' has data-type {x.dtype}; expected FP32 (float32 preprocessed pixels)"
    if x.ndim != len(item_shape) + 1 or any(d not in (-1, s) for d, s in zip(item_shape, x.shape[1:])):
        return f"input '{name}' has shape {list(x.shape)}; expected N x {want}"
    if x.shape[0] < 1 or (max_batch > 0 and x.shape[0] > max_batch):
        return f"input '{name}' has batch {x.shape[0]}; expected 1 to {max_batch or 'any'}"
    if not np.isfinite(x).all():
        bad = int(x.size - np.isfinite(x).sum())
        return (f"input '{name}' holds {bad} NaN or infinite value(s); send finite preprocessed pixels "
                "(sedeploy infer does this)")
    return None


def split_rows(y: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """The engine's output for concatenated requests, cut back into one array per request."""
    bounds = np.cumsum([0, *sizes])
    return [y[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class TritonPythonModel:
    """Triton's python-backend interface (initialize / execute / finalize)."""

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.name = cfg["name"]
        inp, out = cfg["input"][0], cfg["output"][0]
        self.input_name, self.output_name = inp["name"], out["name"]
        self.max_batch = int(cfg.get("max_batch_size", 0))
        dims = [int(d) for d in inp["dims"]]
        # batched: dims are C, H, W; unbatched: the whole shape, whose first dimension is the batch
        self.item_shape = dims if self.max_batch > 0 else dims[1:]
        self.fixed_batch = 0 if self.max_batch > 0 or dims[0] == -1 else dims[0]
        threads = int(params["sedeploy.threads"]) if params.get("sedeploy.threads") else None
        self.runner = open_runner(params["sedeploy.engine"], threads=threads).activate()

    def _check(self, x: np.ndarray) -> str | None:
        err = request_error(x, name=self.input_name, item_shape=self.item_shape,
                            max_batch=self.max_batch or self.fixed_batch)
        if err is None and self.fixed_batch and x.shape[0] != self.fixed_batch:
            err = f"input '{self.input_name}' has batch {x.shape[0]}; this engine takes exactly {self.fixed_batch}"
        return err

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        def error(text: str, code=pb_utils.TritonError.INVALID_ARG):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {text}", code))

        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = error(f"the request has no input '{self.input_name}'")
                continue
            x = tensor.as_numpy()
            reason = self._check(x)
            if reason is not None:
                responses[i] = error(reason)
            else:
                good.append((i, x))
        # a batched model runs the good requests as one batch; an unbatched one runs each as sent
        groups = [good] if self.max_batch > 0 and good else [[g] for g in good]
        for group in groups:
            try:
                y = self.runner.infer(np.ascontiguousarray(np.concatenate([x for _, x in group])))
            except Exception as err:  # the engine failed on valid input: fail this batch only, in one line
                log.error("%s: the engine failed on a batch of %d request(s): %s", self.name, len(group), err)
                for i, _ in group:
                    responses[i] = error(f"the engine failed ({type(err).__name__}: {err})",
                                         pb_utils.TritonError.INTERNAL)
                continue
            for (i, _), part in zip(group, split_rows(np.asarray(y), [len(x) for _, x in group])):
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(self.output_name, np.ascontiguousarray(part, dtype=np.float32))])
        return responses

    def finalize(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.deactivate()
