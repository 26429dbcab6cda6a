"""The ``rewardq`` console script: the producer's commands (``rewardq.client.cli``) and the commands that run or
administer the service (``rewardq.api.commands``, ``selfcheck``), whose server imports wait until they run."""

from __future__ import annotations

from rewardq.api import commands
from rewardq.api.selfcheck import selfcheck
from rewardq.client.cli import main

for _command in (*commands.COMMANDS, selfcheck):
    main.add_command(_command)

__all__ = ["main"]
