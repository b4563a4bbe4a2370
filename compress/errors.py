"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, model, data, output folder), with the fix in the message."""


class NumericalError(RuntimeError):
    """NaN or Inf met in activations or statistics; the message names the layer and module."""


class NonFiniteInput(NumericalError):
    """A statistics hook saw NaN/Inf in a module's input (the layer loop names the module that made it)."""
