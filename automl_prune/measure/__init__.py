"""Measurements of a network's cost on real hardware (latency) and its prediction."""

from __future__ import annotations

from automl_prune.measure.latency import LatencyStats, measure_interleaved, measure_latency, num_threads

__all__ = ["LatencyStats", "measure_interleaved", "measure_latency", "num_threads"]
