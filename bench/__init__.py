"""procqueue's bench suite (run from the repository root)."""
