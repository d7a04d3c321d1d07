"""The one place metalake's version is written: pyproject.toml reads it (a dynamic version),
`metalake --version` prints it and the server logs it at start-up."""

__version__ = "0.1.0"
