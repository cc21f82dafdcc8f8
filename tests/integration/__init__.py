"""Tests of whole systems: real tritonserver, Prometheus, the fake Gemini API, the simulated PLC,
Chromium, and whole training runs (data -> training -> checkpoint -> evaluation)."""
