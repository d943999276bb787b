"""This machine: the application's state id, declarations, environment fingerprints, git sync,
the home directory and its files."""
