"""Using a finished run: held-out evaluation and generation."""
