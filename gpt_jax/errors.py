"""The project's exception types: user mistakes, reported by the scripts as one line and exit status 2."""


class GPTJaxError(Exception):
    """Base class: a problem the user can fix. The message names the problem and the fix."""


class ConfigError(GPTJaxError):
    """A config file, key or value is wrong."""


class DataError(GPTJaxError):
    """The corpus, the token files or a prompt cannot be used."""


class CheckpointError(GPTJaxError):
    """A checkpoint is missing, damaged or does not fit the config."""


class TrainingDiverged(GPTJaxError):
    """The loss became NaN or infinite."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
