"""``python -m capnet`` is the ``capnet`` command."""
from capnet.cli import entry_point

entry_point()
