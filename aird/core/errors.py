"""Errors a user can cause. The CLI prints their message as one sentence and exits non-zero."""


class AirdError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 2


class ModelNotFound(AirdError):
    pass


class UnsupportedModel(AirdError):
    pass


class DataNotFound(AirdError):
    pass


class ArtifactError(AirdError):
    pass


class PluginError(AirdError):
    pass


class DiskFull(AirdError):
    pass
