"""Benchmarks (not timed tests): prefill speed, TTFT per method, store throughput, serving."""
