"""The package's error for a mistake the user can fix. A leaf module: it imports nothing of the package, so library
code (trainers, data, the Hub helpers) can raise it without pulling in the stages."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user gave (arguments, files, a resumed folder, a model that does not fit its role):
    the command line prints it as one line and exits with code 2."""


def check_ranges(config, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = ()) -> None:
    """Refuse (ValueError naming the field and its value) settings outside their meaningful range: `positive`
    fields must be > 0, `non_negative` ones >= 0, `fractions` in [0, 1]. A field set to None is not checked."""
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fractions, lambda v: 0 <= v <= 1, "in [0, 1]")]
    for names, ok, expected in rules:
        for name in names:
            value = getattr(config, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {expected}, got {value}")


__all__ = ["UsageError", "check_ranges"]
