"""Errors whose message is meant for the user: the tools print them without a traceback.

Each names what is wrong and the fix; :func:`mlla_mm.utils.command_line.user_errors` turns them
into one line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = ['CheckpointMismatchError', 'ConfigCheckError', 'InputError']


class ConfigCheckError(ValueError):
    """A config (or a command line) that cannot run; the message names each problem and its fix.

    Args:
        problems: One message, or a list of them (one per problem found); ``str(error)`` lists
            them all, one per line.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f'{len(self.problems)} problems:\n' + '\n'.join(
                f'  - {p}' for p in self.problems
            )
        super().__init__(text)


class CheckpointMismatchError(ConfigCheckError):
    """A checkpoint whose weights do not cover the model that the config builds."""


class InputError(ValueError):
    """An image input that cannot be used; the message names the input and the problem."""
