"""Training recipes built on the library."""
