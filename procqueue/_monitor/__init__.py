"""Watching a pool: the psutil sampler, the Prometheus exporter, the live view."""
