"""The one exception type for mistakes a user can fix: a path, a file, a config value."""


class ExperimentError(Exception):
    """A problem the user can fix; its message says what is wrong and how to fix it.

    Entry points print it on one line without a traceback and exit with status 2. A password in
    the message (of a storage or tracking URL it names) is printed as `***` (`core.secrets`).
    """

    def __str__(self) -> str:
        from experiments.core.secrets import redact

        return redact(super().__str__())
