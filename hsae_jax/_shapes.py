"""Integer helpers for tiling shapes and checks of launch settings (no Triton import)."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_power_of_two(owner: str, **values: int | None) -> None:
    """Raises ValueError naming ``owner.name`` for a value that is not a power of two
    (None means "chosen per shape" and passes)."""
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (
                value & (value - 1)):
            raise ValueError(f"{owner}.{name}={value!r} must be a power of two")


def check_positive(owner: str, **values: int | None) -> None:
    """Raises ValueError naming ``owner.name`` for a value that is not an int >= 1
    (None passes)."""
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name}={value!r} must be an int >= 1")
