"""Imported by the node's fork server, first of its preloaded modules, and nowhere else: the
fork server dies with the node that started it (see ``odium.node.lifeline``)."""

from .lifeline import in_forkserver

in_forkserver()
