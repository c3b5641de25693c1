"""Renamed config keys fail with a message that names the new key, its values and the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from omegaconf import OmegaConf

from lift3d.config import ConfigError, Provenance, check_renamed_keys


@dataclass
class Cfg:
    backend: Literal["auto", "torch", "fast"] = "auto"
    size: int = 1
    renamed_keys: ClassVar[dict[str, str]] = {"implementation": "backend", "n": "size"}


def test_names_the_new_key_the_value_and_the_file():
    prov = Provenance()
    prov.record({"geometry": {"implementation": "torch"}}, "configs/x.yaml")
    with pytest.raises(ConfigError) as exc:
        check_renamed_keys(Cfg, {"implementation": "torch"}, "geometry", prov, "my-geometry")
    assert str(exc.value) == ("config key 'geometry.implementation' (set in configs/x.yaml) for my-geometry was "
                              "renamed to 'backend'; write 'backend: torch' (one of 'auto', 'torch', 'fast').")


def test_an_invalid_old_value_only_names_the_key_and_a_non_literal_has_no_value_list():
    with pytest.raises(ConfigError, match=r"renamed to 'backend'; use 'backend' \(one of 'auto', 'torch', 'fast'\)\.$"):
        check_renamed_keys(Cfg, {"implementation": "tcnn"})
    with pytest.raises(ConfigError, match=r"'n' was renamed to 'size'; use 'size'\.$"):
        check_renamed_keys(Cfg, OmegaConf.create({"n": 3}))


def test_current_keys_parsed_configs_and_classes_without_renames_pass():
    check_renamed_keys(Cfg, {"backend": "torch", "size": 2})
    check_renamed_keys(Cfg, Cfg())
    check_renamed_keys(Cfg, None)

    @dataclass
    class Plain:
        implementation: str = "x"

    check_renamed_keys(Plain, {"implementation": "y"})
