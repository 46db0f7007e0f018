"""Package version: the one place the Python side reads it (CMake parses this file too)."""

__version__ = "0.1.0"
