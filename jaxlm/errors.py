"""The one exception type jaxlm raises for bad input; the CLI prints it as a one-line error."""


class JaxlmError(ValueError):
  """A user-facing error: the message names the problem and, where possible, the fix."""
