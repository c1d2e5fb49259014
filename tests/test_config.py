"""auditor.config: one validated record of every setting, and the views each part reads.

Every bad value is a one-line refusal when the config is built, so no part of the engine ever
sees one; ``to_dict``/``from_dict`` are the report's ``config`` block and what travels to a server.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace

import pytest
from refusals import refused

from auditor import AuditConfig
from auditor.config import Feeding, MetricSettings, SessionSettings
from auditor.errors import AuditError


def test_defaults_are_the_ones_spec_prescribes() -> None:
    config = AuditConfig()
    assert (config.beta, config.batch_size, config.aggregate) == (2.0, 256, "sum")
    assert (config.include_output_layer, config.cna_include_output_layer) == (False, True)
    assert (config.margin_fraction, config.margin_seed, config.target_efficiency) == (0.1, 0, 0.75)
    assert (config.alpha_range, config.scale, config.mean, config.std) == ((0.0, 1.0), None, 0.0, 1.0)
    assert (config.device, config.states_at, config.memory_budget) == ("auto", "pre-activation", 1 << 30)


# --- Refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        {"beta": math.inf},
        {"beta": math.nan},
        {"mean": math.nan},
        {"std": math.inf},
        {"scale": math.nan},
        {"alpha_range": (0.0, math.inf)},
    ],
)
def test_non_finite_settings_are_refused(setting: dict) -> None:
    refused(AuditError, lambda: AuditConfig(**setting), "finite")


@pytest.mark.parametrize("setting", [{"margin_seed": 2**63}, {"margin_seed": -1}, {"batch_size": 2**31}])
def test_settings_that_cannot_travel_to_a_server_are_refused(setting: dict) -> None:
    refused(AuditError, lambda: AuditConfig(**setting))


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"batch_size": 0}, "batch size"),
        ({"aggregate": "max"}, "aggregate must be one of"),
        ({"margin_fraction": 0.0}, "margin fraction"),
        ({"margin_fraction": 1.5}, "margin fraction"),
        ({"target_efficiency": 0.0}, "target efficiency"),
        ({"alpha_range": (1.0, 0.0)}, "alpha range must be increasing"),
        ({"std": 0.0}, "std must not be 0"),
        ({"device": "tpu"}, "device must be one of"),
        ({"states_at": "post-activation"}, "states_at must be one of"),
        ({"memory_budget": 0}, "memory budget"),
        ({"gpu_math": "fp16"}, "gpu_math must be one of"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(setting: dict, fragment: str) -> None:
    refused(AuditError, lambda: AuditConfig(**setting), fragment)


# --- The report's config block ------------------------------------------------------------------


def test_to_dict_is_json_and_from_dict_rebuilds_the_config() -> None:
    config = AuditConfig(beta=0.5, alpha_range=(-1.0, 1.0), scale=2.0, device="cpu", states_at="block-output")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["alpha_range"] == [-1.0, 1.0]
    assert set(data) == {f.name for f in fields(AuditConfig)}
    assert AuditConfig.from_dict(data) == config


def test_from_dict_refuses_unknown_keys_and_defaults_missing_ones() -> None:
    refused(AuditError, lambda: AuditConfig.from_dict({"beta": 2.0, "batch": 5}), "unknown audit setting", "'batch'")
    assert AuditConfig.from_dict({"beta": 3.0}) == AuditConfig(beta=3.0)
    refused(AuditError, lambda: AuditConfig.from_dict({"beta": -1.0}), "beta")


# --- Views: each part reads its own settings ------------------------------------------------------


def test_views_carry_the_settings_of_the_parts_that_read_them() -> None:
    config = AuditConfig(
        beta=0.5, batch_size=7, aggregate="mean", scale=0.5, mean=0.1, std=0.3, device="cpu", states_at="block-output"
    )
    assert config.session == SessionSettings("cpu", "block-output", "exact")
    assert replace(config, gpu_math="tf32").session == SessionSettings("cpu", "block-output", "tf32")
    assert config.feeding == Feeding(7, 0.5, 0.1, 0.3, (0.0, 1.0))
    assert config.metrics == MetricSettings(0.5, False, True, "mean", 0.1, 0, 0.75)


# Settings the audit loop reads itself rather than through a view: the memory budget sizes the
# counting stores of the whole audit, shared by every split.
READ_BY_THE_LOOP = {"memory_budget"}


def test_every_setting_is_read_through_exactly_one_view() -> None:
    """A setting nobody reads is one that ``audit()`` silently ignores (issue 7, point 4): each is in
    one view, or named above as read by the loop."""
    views = [SessionSettings, Feeding, MetricSettings]
    seen = [f.name for view in views for f in fields(view)]
    assert len(seen) == len(set(seen))
    assert not set(seen) & READ_BY_THE_LOOP
    assert set(seen) | READ_BY_THE_LOOP == {f.name for f in fields(AuditConfig)}


@pytest.mark.parametrize(
    ("wanted", "prepared", "served"),
    [
        (("auto", "pre-activation"), ("cpu", "pre-activation"), True),
        (("auto", "pre-activation"), ("cuda", "pre-activation"), True),
        (("cpu", "pre-activation"), ("cpu", "pre-activation"), True),
        (("cpu", "pre-activation"), ("auto", "pre-activation"), False),
        (("cuda", "pre-activation"), ("cpu", "pre-activation"), False),
        (("auto", "block-output"), ("cpu", "pre-activation"), False),
        (("auto", "pre-activation", "exact"), ("cuda", "pre-activation", "tf32"), False),
        (("auto", "pre-activation", "tf32"), ("cuda", "pre-activation", "tf32"), True),
    ],
)
def test_a_prepared_session_serves_settings_it_satisfies(wanted: tuple, prepared: tuple, served: bool) -> None:
    assert SessionSettings(*wanted).satisfied_by(SessionSettings(*prepared)) is served


# --- Memory sizes ---------------------------------------------------------------------------------
