"""The ``odium`` command."""
