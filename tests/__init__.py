"""CloudChat test suite."""
