"""Built-in search spaces, found by name (YAML only)."""
