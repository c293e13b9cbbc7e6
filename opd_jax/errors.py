"""The project's one error type: a message that names the problem on one line."""


class OpdError(ValueError):
    """Bad input or an impossible request. `str(err)` is a single line fit for a user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
