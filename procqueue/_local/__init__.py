"""The local backend: worker processes on this machine and the collector."""
