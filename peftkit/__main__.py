"""`python -m peftkit ...` (and `accelerate launch -m peftkit ...`)."""

from peftkit.cli import main

raise SystemExit(main())
