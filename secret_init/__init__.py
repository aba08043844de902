"""secret-init: materialize secrets into tmpfs files, drop root, exec the app."""

__version__ = "0.1.0"
