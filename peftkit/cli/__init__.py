"""The `peftkit` command line: one module per command (ls.py, show.py, train.py, ...), each
with its examples, its subparser and its handler; app.py lists them and turns errors into exit
codes."""
