"""Models the package can adapt."""
