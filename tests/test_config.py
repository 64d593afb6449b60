import math

import pytest

from adacc_compiler.config import AdaccConfig, parse_bytes


def test_defaults():
    cfg = AdaccConfig()
    assert cfg.memory_budget == 1.0 and cfg.budget_is_fraction
    assert cfg.profile is True and cfg.share_layers is True and cfg.verify is True


@pytest.mark.parametrize(
    "text,expected",
    [("1.5GiB", int(1.5 * 2**30)), ("800 MB", 800 * 10**6), ("4096", 4096), ("2kib", 2048), ("3MiB", 3 * 2**20)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_string_budget_becomes_bytes():
    cfg = AdaccConfig(memory_budget="1.5GiB")
    assert cfg.memory_budget == int(1.5 * 2**30) and not cfg.budget_is_fraction


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, 0, -5, True, None, "lots", "1.5 parsecs", [0.5]])
def test_bad_budget_names_the_option(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        AdaccConfig(memory_budget=bad)


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(ValueError) as err:
        AdaccConfig.from_options({"memory_budgte": 0.5})
    text = str(err.value)
    assert "memory_budgte" in text and "memory_budget" in text and "dump_dir" in text


@pytest.mark.parametrize(
    "options,name",
    [
        ({"profile": "maybe"}, "profile"),
        ({"solver_time_limit": 0}, "solver_time_limit"),
        ({"solver_mip_gap": 1.5}, "solver_mip_gap"),
        ({"share_layers": 3}, "share_layers"),
        ({"dump_dir": 42}, "dump_dir"),
        ({"compress_checkpoints": "sometimes"}, "compress_checkpoints"),
        ({"multi_rebuild": "twice"}, "multi_rebuild"),
    ],
)
def test_bad_values_name_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        AdaccConfig.from_options(options)


def test_environment_defaults_and_option_precedence():
    env = {"ADACC_MEMORY_BUDGET": "0.4", "ADACC_PROFILE": "0", "ADACC_DUMP_DIR": "/tmp/x"}
    cfg = AdaccConfig.from_options(None, environ=env)
    assert cfg.memory_budget == 0.4 and cfg.profile is False and cfg.dump_dir == "/tmp/x"
    cfg = AdaccConfig.from_options({"memory_budget": 0.7}, environ=env)
    assert cfg.memory_budget == 0.7
    assert AdaccConfig.from_options(None, environ={"ADACC_MEMORY_BUDGET": "2GiB"}).memory_budget == 2 * 2**30
    assert AdaccConfig.from_options(None, environ={"ADACC_MEMORY_BUDGET": "123456"}).memory_budget == 123456


def test_fingerprint_tracks_plan_relevant_fields_only():
    a = AdaccConfig(memory_budget=0.5)
    assert a.fingerprint() == AdaccConfig(memory_budget=0.5, dump_dir="/tmp/d").fingerprint()
    assert a.fingerprint() != AdaccConfig(memory_budget=0.4).fingerprint()
    assert a.fingerprint() != AdaccConfig(memory_budget=0.5, profile=False).fingerprint()
    assert a.fingerprint() != AdaccConfig(memory_budget=0.5, compress_checkpoints=False).fingerprint()
    assert a.fingerprint() != AdaccConfig(memory_budget=0.5, multi_rebuild=False).fingerprint()


def test_compress_checkpoints_defaults_on_and_parses():
    assert AdaccConfig().compress_checkpoints is True
    assert AdaccConfig.from_options({"compress_checkpoints": "false"}).compress_checkpoints is False
    env = {"ADACC_COMPRESS_CHECKPOINTS": "0"}
    assert AdaccConfig.from_options(None, environ=env).compress_checkpoints is False


def test_multi_rebuild_defaults_on_and_parses():
    assert AdaccConfig().multi_rebuild is True
    assert AdaccConfig.from_options({"multi_rebuild": False}).multi_rebuild is False
    assert AdaccConfig.from_options(None, environ={"ADACC_MULTI_REBUILD": "off"}).multi_rebuild is False


def test_plan_sqnr_bound_parses_and_converts_to_a_noise_power():
    assert AdaccConfig().min_plan_sqnr_db == 36.0
    cfg = AdaccConfig(min_plan_sqnr_db="30")
    assert cfg.min_plan_sqnr_db == 30.0 and cfg.plan_noise_budget == pytest.approx(1e-3)
    for off in (None, "off", "None"):
        cfg = AdaccConfig(min_plan_sqnr_db=off)
        assert cfg.min_plan_sqnr_db is None and cfg.plan_noise_budget == math.inf
    assert AdaccConfig.from_options(None, environ={"ADACC_MIN_PLAN_SQNR_DB": "35"}).min_plan_sqnr_db == 35.0
    for bad in ("loud", float("inf"), True, [30]):
        with pytest.raises(ValueError, match="min_plan_sqnr_db: expected a finite number of dB"):
            AdaccConfig(min_plan_sqnr_db=bad)
    assert AdaccConfig(min_plan_sqnr_db=30).fingerprint() != AdaccConfig(min_plan_sqnr_db=35).fingerprint()
