"""``python -m capnet`` is the ``capnet`` command."""
import sys

from capnet.cli import main

sys.exit(main())
