"""The ``acrl`` command's entry point: SIGTERM is answered with one line from the first instant (loading torch and
transformers takes seconds), then the command line is loaded and run (:mod:`acrl.app.cli`)."""

from acrl import sigterm

sigterm.install()

from acrl.app.cli import main  # noqa: E402 - after the handler, on purpose

__all__ = ["main"]
