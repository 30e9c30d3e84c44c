"""The one exception the configuration subsystem raises.

A bad configuration is fatal at startup, and the operator's only feedback is
the message, so every problem names the key path (``log.formatter.type``,
``service_credentials[0].location``) and the offending value, and all
problems found in one load are reported together: fixing a file one error per
restart is the experience we want to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigProblem"]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration.

    Attributes:
        message: A complete sentence-like line, e.g. ``"configuration key
            'max_message_size_in_mb': 0 is out of range (1..2048)"``.
        path: The dotted key path (list items as ``[i]``), or ``None`` when
            the problem is about the file itself (unreadable, bad syntax).
        value: The offending value as the user wrote it, with secrets
            replaced by ``"***"`` so the exception can be logged safely.
    """

    message: str
    path: str | None = None
    value: object = None


class ConfigError(Exception):
    """The configuration cannot be used; ``str(err)`` says exactly why.

    Attributes:
        problems: Every problem found, in a stable order (at least one).
        path: The key path of the first problem (``None`` for file-level
            problems), for callers that only care about one.
        value: The offending value of the first problem (secrets masked).
    """

    problems: tuple[ConfigProblem, ...]
    path: str | None
    value: object

    def __init__(
        self,
        message: str | None = None,
        *,
        path: str | None = None,
        value: object = None,
        problems: tuple[ConfigProblem, ...] = (),
    ) -> None:
        """Build the error from one message or from a list of problems.

        Args:
            message: The message of a single problem; ignored when
                ``problems`` is given.
            path: Key path of the single problem.
            value: Offending value of the single problem.
            problems: Several problems to report together.

        Raises:
            ValueError: Neither a message nor any problems were given.
        """
        if not problems:
            if message is None:
                raise ValueError("ConfigError needs a message or problems")
            problems = (ConfigProblem(message, path, value),)
        self.problems = problems
        self.path = problems[0].path
        self.value = problems[0].value
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0].message
        lines = [f"{len(self.problems)} configuration problems:"]
        lines.extend(f"  - {problem.message}" for problem in self.problems)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._format()
