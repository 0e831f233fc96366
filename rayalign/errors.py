"""Errors meant for the person running rayalign: the CLI prints them without a traceback."""


class RayalignError(Exception):
    """Base of every error whose message alone tells the user what to fix."""
