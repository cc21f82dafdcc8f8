"""Throughput and latency benchmarks (they print numbers; tests never time anything)."""
