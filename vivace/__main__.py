"""`python -m vivace`: the same as the `vivace` command."""
import sys

from vivace.cli import main

sys.exit(main())
