"""One construction road: every component is built from its config group by ``_target_``.

| group    | ``_target_`` builds                         | called with (besides its YAML keys)               |
|----------|---------------------------------------------|---------------------------------------------------|
| policy   | an `policies.base.EvictionPolicy`           | nothing                                           |
| task     | an `lshe.tasks.Task` (null keys = defaults) | nothing                                           |
| model    | a factory returning (model, tokenizer)      | ``device``, ``attn_implementation``, ``seed``     |
| runner   | a callable ``runner(cfg) -> metrics``       | nothing                                           |
| logger   | a context manager with ``log_results``      | ``output_dir``, ``run_config``, ``name``, ``group``, ``job_type`` |

A user adds any of them from their own folder: a YAML in ``<folder>/conf/<group>/`` naming their class,
``hydra.searchpath=[file://<folder>/conf]`` and the folder on ``PYTHONPATH`` (README, "Add a ...").
Errors while building become one `ConfigError` naming the group.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from runners.config import ConfigError, group_choices

log = logging.getLogger("lshe")
_GIVES_WEIGHTS = ("lshe", "eager")


def build(group: str, node: DictConfig, expected: type | None = None, /, **kwargs):
    """Instantiate ``node`` (a config with ``_target_``); every failure is a `ConfigError` naming ``group``.

    ``kwargs`` are added as they are, after the node's own arguments are built: nested configs in them
    are not instantiated (the logger's ``run_config`` holds every component's ``_target_``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "_target_" not in node:
        raise ConfigError(f"{group} needs a _target_: the import path of what builds it")
    try:
        factory = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, ImportError) or "Error locating target" in str(err):
            raise ConfigError(
                f"cannot import {group}._target_={node._target_!r}. A component outside this repo must be "
                "importable: put its folder on PYTHONPATH (README, 'Add a policy')"
            ) from None
        raise ConfigError(f"{group}: {err.__cause__ or err}") from None
    try:
        built = factory(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the component's own check of its arguments
        raise ConfigError(f"{group}: {err}") from None
    if expected is not None and not isinstance(built, expected):
        raise ConfigError(
            f"{group}._target_={node._target_!r} built a {type(built).__name__}, not a {expected.__name__}"
        )
    return built


def build_policy(node: DictConfig):
    from policies.base import EvictionPolicy

    return build("policy", node, EvictionPolicy)


def build_task(node: DictConfig):
    """The task; ``null`` values leave the task class's defaults in place."""
    from lshe.tasks import Task

    given = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}
    return build("task", OmegaConf.create(given), Task)


def build_model(cfg: DictConfig, attn_implementation: str, device: str):
    """(model, tokenizer) from ``cfg.model``; a name that does not load lists the model configs."""
    try:
        model, tokenizer = build(
            "model", cfg.model, None, device=device, attn_implementation=attn_implementation, seed=cfg.seed
        )
    except OSError as err:
        raise ConfigError(
            f"model.name={cfg.model.get('name')!r} could not be loaded ({type(err).__name__}: {err}); use one of "
            f"the model configs {group_choices('model')}, a local model directory, or a reachable hub id"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"{err} (model configs: {group_choices('model')})") from None
    return model, tokenizer


def compiled_layers(model, products: str | None = None):
    """The model's compiled decoder layers (``runner.compile=true``, ``runner.products``), made once per
    model; a model whose decoder layers cannot be found is refused before anything runs."""
    from lshe.compiled import compiled_layers as layers_of

    try:
        return layers_of(model, products)
    except ValueError as err:
        raise ConfigError(f"runner.compile=true: {err}; use runner.compile=false") from None


def policy_config(name: str) -> DictConfig:
    """The config of policy ``name`` (``conf/policy/<name>.yaml`` or one on the user's searchpath),
    composed with this job's overrides so that ``${proj_dim}`` and ``${seed}`` resolve as in the job."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = [
            o
            for o in HydraConfig.get().overrides.task
            if not o.split("=")[0].lstrip("+~").startswith("policy")
        ]
    except ValueError:  # not under Hydra (tests): the primary config's defaults
        overrides = []
    try:
        return compose(config_name="config", overrides=[*overrides, f"policy={name}"]).policy
    except Exception as err:  # hydra's MissingConfigException and friends
        raise ConfigError(
            f"runner.policies: no policy config {name!r} ({type(err).__name__}); "
            f"choices include {group_choices('policy')}"
        ) from None


def policy_label(policy) -> str:
    """The job's policy config name (``lshe_key``, a user's ``theirs``), else the policy's ``name``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("policy")
        if choice:
            return str(choice)
    except ValueError:  # not running under Hydra
        pass
    return str(policy.name)


def attention_for(cfg: DictConfig, policies) -> str:
    """The attention implementation to load the model with (always ``"lshe"``, the cache's hook).

    A policy that needs attention weights with an implementation that cannot give them is refused;
    any other implementation is switched to ``"lshe"`` with a note.
    """
    asked = cfg.model.get("attn_implementation", "lshe")
    if asked == "lshe":
        return asked
    for policy in policies:
        if policy.needs_attention and asked not in _GIVES_WEIGHTS:
            raise ConfigError(
                f"policy {policy.name!r} needs attention weights, which model.attn_implementation={asked} "
                "cannot give; use model.attn_implementation=lshe (the default: fused SDPA, explicit weights "
                "only where the cache needs them) or eager"
            )
    log.warning(
        "note: using model.attn_implementation=lshe instead of %s: 'lshe' is the evicting cache's "
        "hook (fused SDPA; explicit attention weights only for policies that need them)",
        asked,
    )
    return "lshe"
