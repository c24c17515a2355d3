"""The evim3 version, here so that the runtime (which never imports the core) and the core read one value."""

__version__ = "0.1.0"
