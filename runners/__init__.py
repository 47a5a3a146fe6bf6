"""Runners and what they share. Importing the package registers the typed config schemas (runners.config)."""

from runners import config as _config  # noqa: F401  (puts the schemas in Hydra's ConfigStore)
