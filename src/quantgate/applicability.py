"""Which (test, case) pairs can apply at all: the rest are not generated, and say why once.

A skip means "could not run here" (no GPU, a GPU without the kernels, weights not cached). A
pair that cannot apply by construction (a speedup of bf16 over itself, SVDQuant's branch cost
of a scheme without a branch, a perceptual metric on random weights) is left out of the
collection instead, and the terminal summary counts what was left out, by reason.

A test declares its condition with ``@pytest.mark.applies.with_args(condition)``, where ``condition``
takes the case, the test's other parameters and the pytest config, and returns None (applies) or the reason it
does not. The conditions below cover the suite's tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from quantgate.cases import Case
from quantgate.schemes import BASELINE, get_scheme

Condition = Callable[[Case, Mapping[str, Any], Any], "str | None"]  # (case, other params, pytest config)
BASELINE_SCHEME, BASELINE_VARIANT = BASELINE, "eager"


def is_baseline(case: Case, scheme: str = BASELINE_SCHEME) -> bool:
    """Whether ``case`` is the eager run of ``scheme`` (bf16 eager: the reference of comparisons)."""
    return case.scheme == scheme and case.variant == BASELINE_VARIANT


def not_the_baseline(param: str = "baseline") -> Condition:
    """Comparisons with the baseline named by the test parameter ``param``, except the baseline itself."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        baseline = params.get(param)
        return f"{baseline} eager against itself" if baseline is not None and is_baseline(case, baseline) else None
    return condition


def scheme_marked(marker: str, what: str) -> Condition:
    """Cases of schemes carrying ``marker`` (``svdquant``, ``gptq``): ``what`` names them in the reason."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        return None if marker in get_scheme(case.scheme).markers else f"the scheme has no {what}"
    return condition


def scheme_detail(key: str, why: str) -> Condition:
    """Cases of schemes whose details carry ``key`` (GPTQ schemes name their round-to-nearest baseline)."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        return None if key in get_scheme(case.scheme).details else why
    return condition


def schemes(*names: str) -> Condition:
    """Cases of exactly these schemes."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        return None if case.scheme in names else f"checks {', '.join(names)} only"
    return condition


def except_schemes(*names: str, why: str) -> Condition:
    """Cases of every scheme but these (``why``: what they are to the test)."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        return why if case.scheme in names else None
    return condition


def takes_a_lora(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
    """Schemes that can take a LoRA (peft, or their own mechanism)."""
    declared = get_scheme(case.scheme).lora_unsupported
    return f"the scheme cannot take a LoRA ({declared})" if declared else None


def fuses_a_lora(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
    """Schemes whose LoRA can be fused into the weights (not those with their own low-rank mechanism)."""
    reason = takes_a_lora(case, params)
    if reason:
        return reason
    scheme = get_scheme(case.scheme)
    if scheme.lora_attach is not None:
        return "the scheme takes a LoRA into its own low-rank branch: there is nothing to fuse"
    why = scheme.details.get("lora_fuse_unsupported")
    return f"fuse_lora cannot fuse into the scheme's layers ({why})" if why else None


def real_weights(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
    """Metrics that judge what images show: random (synthetic, tiny) weights generate noise."""
    return None if case.source in ("hub", "path") else \
        f"judges what images show, and {case.source} weights are random (--quantgate-source hub or path)"


def all_of(*conditions: Condition) -> Condition:
    """Applies when every condition does; the first reason otherwise."""
    def condition(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
        for c in conditions:
            reason = c(case, params, config)
            if reason:
                return reason
        return None
    return condition


def gpu_budget_set(case: Case, params: Mapping[str, Any], config: Any = None) -> str | None:
    """Claims for a smaller card: only under --quantgate-gpu-budget (the command line, ini or plan)."""
    from quantgate import options  # the option's value, not the plugin that parses it

    return None if config is None or options.value(config, "gpu-budget") else \
        "needs --quantgate-gpu-budget (a smaller card's claims)"


def reason_not_applicable(item: Any, case: Case) -> str | None:
    """Why ``item`` (a collected test of ``case``) cannot apply, from its ``applies`` markers, or None."""
    params = dict(getattr(getattr(item, "callspec", None), "params", {}) or {})
    for marker in item.iter_markers("applies"):
        for condition in marker.args:
            reason = condition(case, params, item.config)
            if reason:
                return f"{item.originalname}: {reason}"
    return None
