"""The training loop and what it needs: loss, checkpoints, resume, signals, distribution, launch."""
