"""``cmrcnet train|predict|demo`` (placeholder: being implemented)."""


def register(app) -> None:
    pass
