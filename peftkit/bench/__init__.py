"""`peftkit bench`: the harness, the baselines, FLOPs and reports."""
