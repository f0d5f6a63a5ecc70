"""Errors the package raises for bad input; the CLI turns them into one line and a non-zero exit."""


class FashionMNISTError(Exception):
    """Base class of the package's user-facing errors (bad data, bad configuration, bad files)."""


class DataError(FashionMNISTError):
    """The dataset or an input image is missing, unreadable or corrupt."""


class ConfigError(FashionMNISTError, ValueError):
    """A configuration value is impossible (e.g. ``val_split >= 1`` or ``fold >= num_folds``)."""


class CheckpointError(FashionMNISTError):
    """A checkpoint is missing, unreadable, corrupt, of another model, or cannot be written."""


class TrainingDiverged(FashionMNISTError):
    """The training loss became NaN or infinite: the run stops before a broken model is saved."""


class WriteError(FashionMNISTError):
    """A run's file could not be written (a full disk, a folder gone read-only); says what was kept."""
