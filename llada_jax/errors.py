"""User-facing errors: bad config values, flags, files or checkpoints.

Command-line entry points turn these into one line on stderr and exit code 2, without a traceback;
anything else that escapes is a bug and keeps its traceback.
"""


class LladaError(Exception):
  """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(LladaError, ValueError):
  """A config field or an argument has a value that is not allowed."""


class CheckpointError(LladaError):
  """A checkpoint is missing, unreadable or does not match the config."""


class TrainingDiverged(LladaError):
  """The loss or gradient stayed non-finite after the allowed number of rollbacks."""


class DoesNotFit(LladaError):
  """The compiler found that a program needs more memory than the target device has."""


class SaveFailed(LladaError):
  """A checkpoint could not be written (storage unreachable, disk full); training stopped so as
  not to go on as if it had been saved."""
