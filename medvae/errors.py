"""User-facing errors. The CLI prints the message of a MedvaeError in one line and exits 2.

A message names the file or key at fault and what to do about it. Bugs are not MedvaeErrors.
"""


class MedvaeError(Exception):
    """A mistake in the user's data, configuration or command line."""

    exit_code = 2


class InputError(MedvaeError):
    """A scan, manifest or directory that cannot be used as given."""


class ConfigError(MedvaeError):
    """An unknown key, bad value or unreadable YAML configuration."""


class StoreError(MedvaeError):
    """A patch store that is missing, incomplete or of another format version."""


class CheckpointError(MedvaeError):
    """A checkpoint that is missing, corrupt, tampered with or incompatible."""


class TrainingError(MedvaeError):
    """Training that cannot go on (e.g. too many non-finite steps)."""
