import sys

from cerebrum_jax.cli import entry

sys.exit(entry())
