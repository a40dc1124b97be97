"""`python -m studio ...`: the `studio` command (studio.cli)."""
import sys

from studio.cli import main

sys.exit(main())
