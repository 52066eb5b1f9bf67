"""The one exception type for bad input: it always names the file or config key."""


class ReproInputError(ValueError):
    """A missing, truncated, foreign or malformed input (file or config value).

    The message must name the offending file path or config key so that the user
    can find it without reading a traceback.
    """
