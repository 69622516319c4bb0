"""The `peftkit` command line."""
