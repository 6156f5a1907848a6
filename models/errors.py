class ModelError(ValueError):
    """A model could not be described: unknown id, bad config, corrupt header."""
