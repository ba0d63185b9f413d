"""Generating pictures: pipelines and samplers, generate(), the fast path."""
