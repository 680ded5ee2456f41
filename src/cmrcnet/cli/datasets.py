"""``cmrcnet datasets`` (placeholder: being implemented)."""


def register(app) -> None:
    pass
