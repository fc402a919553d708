"""Serving sedeploy engines with Triton Inference Server.

- :mod:`sedeploy.serving.triton_repo` — ``package_triton``: a Triton *model repository* (one model per engine,
  ``config.pbtxt`` checked against Triton's own ``ModelConfig`` protobuf) for Triton's native TensorRT, ONNX
  Runtime and OpenVINO backends (the NGC container, Kubernetes/KServe).
- :mod:`sedeploy.serving.triton_config` — one model's ``config.pbtxt``: Triton's backend names, the batching
  policy (from bench results or defaults), its check by Triton's ``ModelConfig``.
- :mod:`sedeploy.serving.server` — ``serve``: a real ``tritonserver`` (the one PyTriton ships) on this machine,
  running one engine with Triton's dynamic batcher (HTTP, gRPC, health, Prometheus metrics); its process
  (stopping it with its stubs, its error lines, stale run folders) in :mod:`sedeploy.serving.process`.
- :mod:`sedeploy.serving.python_model` — the Triton python-backend model ``serve`` runs: every request checked on
  its own before the batch runs, so a bad request fails alone.
- :mod:`sedeploy.serving.client` — ``infer_images``: images → sedeploy's preprocessing → Triton → top-k labels.
- :mod:`sedeploy.serving.env` — the serve extra's checks (PyTriton/numpy, the python-backend stub's libpython).

Everything heavy (pytriton, tritonclient, protobuf) is imported inside functions: ``pip install 'sedeploy[serve]'``.
"""
