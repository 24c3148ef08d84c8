"""``python -m sgexp.sweeps --study NAME ...``: see ``sgexp.sweeps.cli``."""

from sgexp.sweeps.cli import command_line

command_line()
