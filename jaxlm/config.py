"""Config validation: what a run's config must satisfy before anything is built or loaded."""

from jaxlm.train import validate_config  # noqa: F401  (temporary shim; replaced by the real module on merge)
