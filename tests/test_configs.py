"""Every YAML in conf/ composes and instantiates; the configs mirror the objects they build."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.plugins.launcher import Launcher
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lshe.tasks import Task
from lshe.tasks.passkey import Passkey
from policies.base import EvictionPolicy
from runners import components
from runners.common import OutputCheck
from runners.config import ConfigError, check_budget, validate
from runners.evaluate import task_settings
from runners.sweep import SweepReport
from runners.wandb_logger import NullLogger, WandbLogger

torch.set_num_threads(1)
# conf/hydra/launcher/*.yaml keep the plugins' names (checked against their schemas; Hydra warns about that)
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "policy", "task", "runner", "logger", "experiment", "hydra/launcher", "hydra/job_logging")
# Whole-file coverage: every YAML under conf/ belongs to the primary config or to one of GROUPS.
COVERED = {"config.yaml"} | {f"{g}/{p.name}" for g in GROUPS for p in (CONF / g).glob("*.yaml")}


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cfg_with(*overrides: str, hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_yaml_is_covered_by_these_tests():
    on_disk = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert on_disk == COVERED, f"YAML files no test composes: {sorted(on_disk - COVERED)}"


def make_task(cfg):
    return components.build_task(cfg.task)


def test_defaults_match_the_design_card():
    cfg = cfg_with()
    validate(cfg)
    assert cfg.model.name == "smollm2-135m"
    assert cfg.task._target_ == "lshe.tasks.passkey.Passkey"
    assert cfg.policy._target_ == "policies.lshe.LSHEPolicy"
    assert (cfg.budget, cfg.slots, cfg.proj_dim, cfg.seed, cfg.batch_size) == (0.5, None, 16, 0, 1)
    assert cfg.limit is None and cfg.device == "auto" and cfg.diagnostics is False
    assert cfg.runner._target_ == "runners.evaluate.Evaluate"
    assert cfg.logger._target_ == "runners.wandb_logger.WandbLogger"
    assert set(cfg.cache) == {"sink", "recent", "prefill", "window", "protocol"}
    assert cfg.cache.protocol == "joint"  # the whole prompt prefilled at once, as before kvpress existed


def test_design_card_overrides_reach_the_policy():
    cfg = cfg_with("policy=lshe", "proj_dim=8", "budget=0.3", "seed=3")
    policy = components.build_policy(cfg.policy)
    assert (policy.proj_dim, policy.seed, cfg.budget) == (8, 3, 0.3)


@pytest.mark.parametrize("name", names("policy"))
def test_policy_configs_instantiate(name):
    cfg = cfg_with(f"policy={name}")
    policy = components.build_policy(cfg.policy)
    assert isinstance(policy, EvictionPolicy)
    assert components.policy_label(policy) == policy.name  # outside Hydra: the policy's own name
    if name == "lshe_key":
        assert policy.probe == "key"


@pytest.mark.parametrize("name", names("task"))
def test_task_configs_instantiate_and_list_every_task_argument(name):
    cfg = cfg_with(f"task={name}", "seed=1")
    task = make_task(cfg)
    cls = type(task)
    assert isinstance(task, Task) and task.name == name
    assert cfg.task._target_ == f"{cls.__module__}.{cls.__name__}"
    assert task.seed == 1  # ${seed} reaches the task
    # Every constructor argument is a key (so `task.<arg>=...` works without '+'), and no other key.
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(cfg.task) - {"_target_"} == params
    # null leaves the class default; a value overrides it
    assert task.n_examples == cls().n_examples
    assert make_task(cfg_with(f"task={name}", "task.n_examples=3")).n_examples == 3
    assert task.examples()[:1]  # builds real examples (no tokenizer: length estimated from characters)


def test_task_null_means_class_default_and_values_override():
    task = make_task(cfg_with("task=passkey"))
    assert task.context_tokens == Passkey().context_tokens
    assert make_task(cfg_with("task=passkey", "task.context_tokens=500")).context_tokens == 500
    settings = task_settings(make_task(cfg_with("task=passkey", "task.depth=0.5", "seed=2")))
    assert settings["depths"] == [0.5] and settings["seed"] == 2
    assert settings["answer_prefix"] == Passkey().answer_prefix


def test_model_config_tiny_llama_loads():
    cfg = cfg_with("model=tiny-llama")
    model, tokenizer = components.build_model(cfg, "lshe", "cpu")
    assert model.config._attn_implementation == "lshe" and tokenizer.padding_side == "left"


@pytest.mark.real_model
def test_model_config_smollm2_loads():
    cfg = cfg_with("model=smollm2-135m")
    model, tokenizer = components.build_model(cfg, "lshe", "cpu")
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template


def test_model_config_of_a_random_weight_shape_builds_that_shape():
    """model=llama-3.1-8b-shape is random weights in a real shape (built here narrower, with 1 layer)."""
    cfg = cfg_with("model=llama-3.1-8b-shape", "model.config.num_hidden_layers=1", "model.dtype=float32")
    cfg.model.config.hidden_size, cfg.model.config.intermediate_size = 256, 512
    cfg.model.config.num_attention_heads, cfg.model.config.head_dim = 4, 64
    cfg.model.config.num_key_value_heads = 1
    model, tokenizer = components.build_model(cfg, "lshe", "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 128256
    assert model.config._attn_implementation == "lshe" and model.config.name_or_path == "llama-3.1-8b-shape"
    assert tokenizer.decode(tokenizer("hello")["input_ids"]) == "hello"
    full = cfg_with("model=llama-3.1-8b-shape").model.config
    assert (full.hidden_size, full.num_hidden_layers, full.num_key_value_heads) == (4096, 32, 8)


def test_model_configs_are_all_tested():
    assert names("model") == ["llama-3.1-8b-shape", "smollm2-135m", "tiny-llama"]


@pytest.mark.parametrize("name", names("runner"))
def test_runner_configs_build_a_callable_runner(name):
    runner = components.build("runner", cfg_with(f"runner={name}").runner)
    assert callable(runner)


@pytest.mark.parametrize("name", names("logger"))
def test_logger_configs_build_a_logger(tmp_path, name):
    cfg = cfg_with(f"logger={name}")
    logger = components.build("logger", cfg.logger, None, output_dir=str(tmp_path), run_config={}, name=None,
                              sweep_group=None, job_type="evaluate")  # fmt: skip
    assert isinstance(logger, WandbLogger if name == "wandb" else NullLogger)
    if name == "wandb":
        assert logger.mode in ("offline", "online", "disabled")


def test_wandb_mode_defaults_to_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cfg_with("logger=wandb").logger.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert cfg_with("logger=wandb").logger.mode == "online"


@pytest.mark.parametrize("name", names("hydra/launcher"))
def test_launcher_configs_instantiate(name):
    cfg = cfg_with(f"hydra/launcher={name}", hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, Launcher)
    assert type(launcher).__module__.startswith("hydra_plugins.")


def test_sweep_report_callback_is_configured():
    cfg = cfg_with(hydra=True)
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_report), SweepReport)
    assert isinstance(instantiate(cfg.hydra.callbacks.output_check), OutputCheck)
    # the job folder is named by its overrides, swept floats rounded (runners.sweep.tidy_dirname)
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${lshe_tidy:${hydra.job.override_dirname}}"


@pytest.mark.parametrize("name", names("experiment"))
def test_experiment_configs_compose_for_every_swept_value(name):
    cfg = cfg_with(f"experiment={name}", hydra=True)
    params = cfg.hydra.sweeper.params
    assert params, f"experiment {name} sweeps nothing"
    assert "${oc.env:LSHE_ROOT,.}/outputs/multirun/" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]
    swept = {key: str(values).split(",") for key, values in params.items()}
    for key, values in swept.items():
        for value in values:
            job = cfg_with(f"experiment={name}", f"{key}={value}")
            validate(job)
            components.build_policy(job.policy)
            make_task(job)
    # the first job of the sweep: all swept keys set at once
    first = cfg_with(f"experiment={name}", *[f"{key}={values[0]}" for key, values in swept.items()])
    validate(first)
    components.build_policy(first.policy)


def test_experiments_sharing_a_sweep_folder_give_every_job_its_own_folder():
    """Jobs of experiments that write into one sweep folder never share a job folder (a shared folder
    makes jobs of different tasks wait on each other's lock and overwrite each other's results)."""
    import itertools

    by_folder: dict[str, dict[str, str]] = {}
    for name in names("experiment"):
        cfg = cfg_with(f"experiment={name}", hydra=True)
        folder = OmegaConf.to_container(cfg.hydra.sweep)["dir"]
        excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
        params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items() if k not in excluded}
        for values in itertools.product(*params.values()):
            job = ",".join(sorted(f"{k}={v}" for k, v in zip(params, values, strict=True)))
            owner = by_folder.setdefault(folder, {}).setdefault(job, name)
            assert owner == name, f"{name} and {owner} both write {folder}/{job}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+budgte=0.3",
            r"^unknown key 'budgte' \(added with \+\): the top-level keys are \['model', 'policy',",
        ),
        ("+foo=1", r"^unknown key 'foo' \(added with \+\)"),
        (
            "+cache.foo=1",
            r"^unknown key 'cache.foo' \(added with \+\): the cache keys are \['sink', 'recent',",
        ),
    ],
)
def test_keys_added_with_plus_that_the_schema_does_not_declare_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_with(override))


def test_component_groups_keep_their_own_added_keys():
    validate(cfg_with("+policy.extra=1", "+task.extra=2"))  # their constructors check them


@pytest.mark.parametrize(
    ("budget", "hint"), [(1.5, None), (4, "slots=4"), (5, "budget=0.05"), (30, "budget=0.3")]
)
def test_a_budget_above_one_suggests_the_percent_reading_only_from_five(budget, hint):
    with pytest.raises(ConfigError) as err:
        check_budget(budget, None)
    message = str(err.value)
    if hint is None:
        assert "did you mean" not in message, message
    else:
        assert hint in message, message
    if budget < 5:
        assert "% of the cache" not in message, message


@pytest.mark.parametrize("batches", ["[2,3]", "[4,2,3]", "[1,2,5,max]"])
def test_bench_batches_that_are_not_multiples_of_the_one_before_are_refused(batches):
    with pytest.raises(ConfigError, match=r"runner.batches must each be a multiple of the one before"):
        validate(cfg_with("runner=bench", f"runner.batches={batches}"))


@pytest.mark.parametrize("batches", ["[1,2,4]", "[4,2,max]", "[3,max,6]"])
def test_bench_batches_that_are_multiples_pass(batches):
    validate(cfg_with("runner=bench", f"runner.batches={batches}"))


def test_every_bool_argument_of_a_policy_or_task_refuses_anything_but_a_bool():
    """Component keys are untyped in the config: ``task.chat_template=no`` arrives as the string 'no'."""
    from lshe.tasks import TASKS
    from policies import POLICIES

    checked = []
    for cls in [*POLICIES.values(), *TASKS.values()]:
        for arg, param in inspect.signature(cls.__init__).parameters.items():
            if param.annotation not in (bool, "bool"):
                continue
            for value in ("no", "maybe", 1):
                with pytest.raises(ValueError, match=rf"{arg} must be true or false, got {value!r}"):
                    cls(**{arg: value})
            checked.append(f"{cls.__name__}.{arg}")
    assert "LSHEPolicy.norm_aware" in checked and "Passkey.chat_template" in checked, checked


@pytest.mark.parametrize("runner", ["bench", "evaluate"])
def test_runner_products_is_null_inductor_or_gemv_and_a_choice_needs_compile(runner):
    with pytest.raises(
        ConfigError, match=r"runner.products must be one of \['inductor', 'gemv'\], got 'cublas'"
    ):
        validate(cfg_with(f"runner={runner}", "runner.compile=true", "runner.products=cublas"))
    for products in ("gemv", "inductor"):
        with pytest.raises(ConfigError, match=rf"runner.products={products} .* needs runner.compile=true"):
            validate(cfg_with(f"runner={runner}", f"runner.products={products}"))
        validate(cfg_with(f"runner={runner}", "runner.compile=true", f"runner.products={products}"))
    validate(cfg_with(f"runner={runner}"))  # the default: null, lshe.compiled.PRODUCTS when compiled
    validate(cfg_with(f"runner={runner}", "runner.compile=true"))
