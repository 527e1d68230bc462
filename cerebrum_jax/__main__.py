"""``python -m cerebrum_jax``: the console script (what ``entry`` restarts with jemalloc preloaded)."""

import sys

try:
    from cerebrum_jax.cli import entry
except KeyboardInterrupt:  # a Ctrl-C in the first milliseconds, before the command line's handlers exist
    print("cerebrum-jax: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(entry())
