"""Measurements of a network's cost on real hardware (latency)."""

from __future__ import annotations

from automl_prune.measure.latency import LatencyStats, LatencyTable, measure_latency, num_threads

__all__ = ["LatencyStats", "LatencyTable", "measure_latency", "num_threads"]
