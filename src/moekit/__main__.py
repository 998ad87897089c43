"""`python -m moekit ...` = `moekit ...` (a checkout on PYTHONPATH has no console script)."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main())
