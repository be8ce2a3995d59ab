"""The package version, in a module of its own so that any module can import it without cycles
(``headstart/__init__.py`` imports most of the package before it could define it)."""

__version__ = "0.1.0"
