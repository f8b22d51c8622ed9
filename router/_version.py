"""kvroute's version: the one place it is written (pyproject.toml reads it; `kvroute --version`,
`router.__version__` and the `kvroute_build_info` metric report it)."""

__version__ = "0.1.0"
