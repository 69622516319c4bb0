"""`python -m peftkit ...` (and `accelerate launch -m peftkit ...`)."""

from peftkit.cli.app import main

raise SystemExit(main())
