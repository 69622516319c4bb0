"""Turning a finished run into something else: a merged, verified model."""
