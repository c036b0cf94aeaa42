"""Errors raised by jaxrep for bad input."""


class ConfigError(ValueError):
  """A configuration field, flag or argument has a value jaxrep cannot use.

  The message always names the field and says what is allowed.
  """


def require(condition: bool, field: str, message: str) -> None:
  """Raises ConfigError naming `field` unless `condition` holds."""
  if not condition:
    raise ConfigError(f"{field}: {message}")
