"""python -m loadtest [sweep] ..."""

import sys

from loadtest.cli import main

raise SystemExit(main(sys.argv[1:]))
