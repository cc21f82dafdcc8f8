"""The test suite: `tests/unit` needs no server and trains nothing for long (`make test-unit`,
about 1.5 min on 2 cores); `tests/integration` starts tritonserver, Prometheus, a fake Gemini
API, a simulated PLC or a browser, and runs whole trainings (`make test` runs both)."""
