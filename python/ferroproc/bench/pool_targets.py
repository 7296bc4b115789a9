"""Task functions of the pool benchmark cases (import-free, like `targets`)."""


def square(x):
    """x * x."""
    return x * x
