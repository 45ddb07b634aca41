"""``python -m otflow`` is the ``otflow`` command."""
import sys

from .cli import main

sys.exit(main())
