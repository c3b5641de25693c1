from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from lift3d.config import (
    CLI_SOURCE,
    ConfigError,
    Schedule,
    Scheduled,
    ScheduledInt,
    load_config,
    parse_structured,
    resolve,
)


@dataclass
class Inner:
    radius: float = 1.0
    levels: int = 16
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    weights: list[float] = field(default_factory=list)
    lam: Scheduled = 1.0
    res: ScheduledInt = 64
    maybe: Optional[int] = None


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_unknown_key_names_key_path_file_and_valid_keys(tmp_path):
    p = _write(tmp_path, "r.yaml", "inner:\n  raduis: 2.0\n")
    raw, prov = load_config(p)
    with pytest.raises(ConfigError) as err:
        parse_structured(Outer, resolve(raw, prov), prov=prov)
    msg = str(err.value)
    assert "inner.raduis" in msg and str(p) in msg
    assert "Did you mean 'radius'" in msg and "Valid keys: radius, levels, mode" in msg


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    base = _write(tmp_path, "base.yaml", "inner:\n  levels: 8\n")
    child = _write(tmp_path, "sub/child.yaml", "extends: ../base.yaml\ninner:\n  levels: many\n")
    raw, prov = load_config(child)
    with pytest.raises(ConfigError) as err:
        parse_structured(Outer, resolve(raw, prov), prov=prov)
    msg = str(err.value)
    assert "inner.levels" in msg and "child.yaml" in msg and "an integer" in msg and "'many'" in msg
    assert base.exists()


def test_literal_and_bool_are_strict():
    with pytest.raises(ConfigError, match="one of 'a', 'b'"):
        parse_structured(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match="a number"):
        parse_structured(Outer, {"inner": {"radius": True}})
    assert parse_structured(Outer, {"inner": {"radius": 2}}).inner.radius == 2.0


def test_extends_chain_and_list_merge_in_order(tmp_path):
    _write(tmp_path, "a.yaml", "name: a\ninner:\n  radius: 1.5\n  levels: 4\n")
    _write(tmp_path, "b.yaml", "name: b\ninner:\n  levels: 8\n")
    c = _write(tmp_path, "c.yaml", "extends: [a.yaml, b.yaml]\ninner:\n  mode: b\n")
    raw, prov = load_config(c)
    cfg = parse_structured(Outer, resolve(raw, prov), prov=prov)
    assert (cfg.name, cfg.inner.radius, cfg.inner.levels, cfg.inner.mode) == ("b", 1.5, 8, "b")
    assert prov.source("inner.levels").endswith("b.yaml")
    assert prov.source("inner.mode").endswith("c.yaml")


def test_bad_extends_missing_file_and_cycle(tmp_path):
    p = _write(tmp_path, "x.yaml", "extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist \(named by 'extends' in .*x.yaml\)"):
        load_config(p)
    _write(tmp_path, "c1.yaml", "extends: c2.yaml\n")
    c2 = _write(tmp_path, "c2.yaml", "extends: c1.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(c2)
    bad = _write(tmp_path, "bad.yaml", "extends: {a: 1}\n")
    with pytest.raises(ConfigError, match="must be a file path or a list"):
        load_config(bad)


def test_overrides_interpolation_and_resolvers(tmp_path):
    p = _write(
        tmp_path,
        "r.yaml",
        "prompt: ''\nsystem:\n  prompt_processor:\n    prompt: ${prompt}\n  rate: ${exp_decay_rate:0.1,100}\n"
        "  half: ${div:${system.steps},2}\n  steps: 10\n",
    )
    raw, prov = load_config(p, ["prompt=a red cube", "system.steps=40"])
    data = resolve(raw, prov)
    assert data["system"]["prompt_processor"]["prompt"] == "a red cube"
    assert data["system"]["half"] == 20
    assert data["system"]["rate"] == pytest.approx(0.1 ** (1 / 100))
    assert prov.source("prompt") == CLI_SOURCE


def test_a_bare_prompt_override_is_the_empty_prompt_not_null(tmp_path):
    # A shell passes prompt="" as `prompt=`, which YAML would read as null.
    p = _write(tmp_path, "r.yaml", "prompt: a red cube\nseed: 0\n")
    raw, prov = load_config(p, ["prompt=", "seed=1"])
    data = resolve(raw, prov)
    assert data["prompt"] == ""
    assert data["seed"] == 1
    raw, _ = load_config(p, ["seed="])  # other keys keep YAML's reading
    assert raw.seed is None


def test_override_must_be_key_value(tmp_path):
    p = _write(tmp_path, "r.yaml", "a: 1\n")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["justaword"])


def test_unknown_override_key_is_reported_as_from_command_line(tmp_path):
    p = _write(tmp_path, "r.yaml", "name: z\n")
    raw, prov = load_config(p, ["inner.levles=3"])
    with pytest.raises(ConfigError, match="inner.levles.*the command line.*Did you mean 'levels'"):
        parse_structured(Outer, resolve(raw, prov), prov=prov)


def test_override_indexes_a_list_and_names_a_bad_index(tmp_path):
    p = _write(tmp_path, "r.yaml",
               "stages:\n  - name: coarse\n    steps: 600\n  - name: fine\n    steps: 300\n    geo: {a: 1}\n")
    raw, prov = load_config(p, ["stages.1.steps=50", "stages.1.geo={b: 2}", "stages.0.name=first"])
    data = resolve(raw, prov)
    assert data["stages"] == [{"name": "first", "steps": 600}, {"name": "fine", "steps": 50, "geo": {"a": 1, "b": 2}}]
    assert prov.source("stages[1].steps") == CLI_SOURCE and prov.source("stages[0].steps").endswith("r.yaml")
    with pytest.raises(ConfigError, match=r"'stages.2.steps': stages is a list of 2 items.*0..1, not '2'"):
        load_config(p, ["stages.2.steps=5"])
    with pytest.raises(ConfigError, match=r"stages is a list of 2 items.*not 'fine'"):
        load_config(p, ["stages.fine.steps=5"])


def test_schedule_forms():
    s = Schedule.parse([100, 1.0, 0.0, 200])
    assert [s(0), s(100), s(150), s(200), s(10_000)] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    pw = Schedule.parse([[0, 0.0], [10, 1.0], [20, 3.0]])
    assert [pw(5), pw(15), pw(30)] == pytest.approx([0.5, 2.0, 3.0])
    st = Schedule.parse({"points": [[0, 64], [100, 128]], "interp": "step"}, integer=True)
    assert (st(99), st(100)) == (64, 128)
    ex = Schedule.parse({"points": [[0, 1e-2], [100, 1e-4]], "interp": "exp"})
    assert ex(50) == pytest.approx(1e-3)
    assert Schedule.parse(3) == 3.0


@pytest.mark.parametrize("bad", [[1, 2, 3], [[0, 1], [5]], "fast", [200, 1.0, 0.0, 100], {"points": [[0, 1]], "x": 1}])
def test_bad_schedules_are_errors_naming_the_key(bad):
    with pytest.raises(ConfigError, match="config key 'lam'"):
        parse_structured(Outer, {"lam": bad})


def test_scheduled_fields_parse_to_schedules():
    cfg = parse_structured(Outer, {"lam": [0, 1.0, 2.0, 10], "res": [[0, 32], [10, 64]]})
    assert isinstance(cfg.lam, Schedule) and cfg.lam(5) == pytest.approx(1.5)
    assert cfg.res(5) == 48 and isinstance(cfg.res(5), int)
