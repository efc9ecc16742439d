"""The one error type model loading raises: a single line naming the file, key or name at fault."""


class ModelLoadError(ValueError):
    """A model, bundle or checkpoint could not be loaded; the message is one line for the user."""
