"""Runners and what they share. Importing the package registers the typed config schemas (runners.config)."""

from runners import config as _config  # noqa: F401  (puts the schemas in Hydra's ConfigStore)


def _register_resolvers() -> None:
    """``${lshe_tidy:...}``: hydra.sweep.subdir with swept floats rounded (`runners.sweep.tidy_dirname`)."""
    from omegaconf import OmegaConf

    def tidy(dirname: str) -> str:
        from runners.sweep import tidy_dirname

        return tidy_dirname(dirname)

    if not OmegaConf.has_resolver("lshe_tidy"):
        OmegaConf.register_new_resolver("lshe_tidy", tidy)


_register_resolvers()
