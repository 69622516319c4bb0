"""The run directory and what a run publishes: layout, metrics, card, plots, trackers, Hub."""
