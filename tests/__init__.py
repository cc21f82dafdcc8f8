"""The test suite: `tests/unit` runs without servers (`make test-unit`), `tests/integration` starts
tritonserver, Prometheus, a fake Gemini API, a simulated PLC or a browser (`make test` runs both)."""
