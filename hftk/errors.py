"""The one exception type that means "the user's input is wrong" (exit status 2)."""


class UserError(Exception):
    """Bad input: a recipe key, a file, a column, a flag. The message is shown as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
