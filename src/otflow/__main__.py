"""``python -m otflow`` is the ``otflow`` command."""
import sys

from .training.cli import main

sys.exit(main())
