"""procqueue's bench suite: procqueue against its peers, side by side (`procqueue bench`)."""
