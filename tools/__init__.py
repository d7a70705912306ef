"""Command-line tools around training: python -m tools.NAME --help."""
