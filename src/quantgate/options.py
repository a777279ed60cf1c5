"""Reading quantgate's options: the command line, then the ini file, then the session's plan.

Every ``--quantgate-NAME`` option is also an ini key ``quantgate_NAME``; a plan
(``fixtures/plans/<plan>.toml``) may set defaults for any of them in its ``[options]`` table.
The command line wins over the ini file, which wins over the plan, which wins over the
built-in default. The plan is found here, once per session, so every sub-plugin reads its
options the same way.
"""

from __future__ import annotations

import pytest

from quantgate.cases import selector_vocabulary
from quantgate.errors import ConfigFileError, UnknownNameError
from quantgate.plans import DEFAULT_PLAN, Plan, find_plan, load_plan, plan_dirs

_PLAN = pytest.StashKey["Plan | None"]()
PLAN_PREVIEW_ENV = "QUANTGATE_PLAN_PREVIEW"  # set by `quantgate plan`: collect the GPU tier without a GPU
# Options that choose cases: given alone (without --quantgate-plan) they select exactly their matrix.
SELECTION_OPTIONS = ("models", "schemes", "variants", "batch")


def dest(name: str) -> str:
    return f"quantgate_{name.replace('-', '_')}"


def given(config: pytest.Config, name: str) -> str | None:
    """The value of ``--quantgate-NAME`` from the command line or the ini file, else None."""
    value = config.getoption(dest(name), None)
    if value is None:
        try:
            value = config.getini(dest(name)) or None
        except ValueError:  # not an ini key (registered by a plugin that is not loaded)
            value = None
    return value


def session_plan(config: pytest.Config) -> Plan | None:
    """The plan this session runs: ``--quantgate-plan``, else ``merge`` when no selection option is
    given and the repository has it; None when the options alone select (or there are no plans)."""
    if _PLAN in config.stash:
        return config.stash[_PLAN]
    name = given(config, "plan")
    plan = None
    if name is None and all(given(config, option) is None for option in SELECTION_OPTIONS):
        default = plan_dirs(config.rootpath)[0] / f"{DEFAULT_PLAN}.toml"
        name = DEFAULT_PLAN if default.is_file() else None
    if name is not None:
        try:
            plan = load_plan(find_plan(name, plan_dirs(config.rootpath)), selector_vocabulary())
        except (ConfigFileError, UnknownNameError) as exc:
            raise pytest.UsageError(f"--quantgate-plan: {exc}") from None
    config.stash[_PLAN] = plan
    return plan


def value(config: pytest.Config, name: str, default: str | None = None) -> str | None:
    """``--quantgate-NAME``: command line, ini, the plan's ``[options]``, then ``default``."""
    found = given(config, name)
    if found is not None:
        return found
    plan = session_plan(config)
    if plan is not None and name in plan.options:
        return plan.options[name]
    return default
