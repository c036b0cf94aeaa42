"""Shared foundations: errors and value checks, named random streams, pytree
helpers, the version."""

from jaxrep.core.errors import ConfigError, require
