"""The serving runtime: what runs inside (and around) tritonserver.

- `runtime`: the plain functions the Python-backend models run (request checks, decoding to
  model tensors, ONNX Runtime batches, the verdict and its metrics), tested without a server;
- `triton_models`: the thin Python-backend adapters the repository generator copies;
- `server`: launches the real tritonserver on a repository and waits until it is ready;
- `watchdog`: probes a running server with a known cell and restarts it when inference fails.

Imports only `core` and `ensemble` (and tritonclient for the watchdog's probe).
"""
