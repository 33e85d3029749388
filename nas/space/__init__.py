"""The search-space file: the YAML schema, validation (every problem at once, with its path) and built-in spaces."""

from nas.space.schema import ConfigError, Problem, RunConfig, builtin_spaces, load_config, parse_config, resolve_space

__all__ = ["ConfigError", "Problem", "RunConfig", "builtin_spaces", "load_config", "parse_config", "resolve_space"]
