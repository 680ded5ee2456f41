"""``cmrcnet benchmark|report`` (placeholder: being implemented)."""


def register(app) -> None:
    pass
