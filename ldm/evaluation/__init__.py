"""Measuring: probes, sweeps, pictures of the process, the benchmark, the peer comparison. Nothing else in ldm
imports it."""
