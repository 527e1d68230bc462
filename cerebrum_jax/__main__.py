import sys

from cerebrum_jax.cli import main

sys.exit(main())
