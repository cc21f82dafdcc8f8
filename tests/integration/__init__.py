"""Tests that start real servers: tritonserver, Prometheus, the fake Gemini API, the simulated PLC, Chromium."""
