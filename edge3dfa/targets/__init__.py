"""Runtimes behind the one :class:`edge3dfa.target.Target` interface; each module imports its framework lazily."""

from edge3dfa.target import Target, open_target

__all__ = ["Target", "open_target"]
