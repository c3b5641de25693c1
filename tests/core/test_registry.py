from __future__ import annotations

import pytest

from lift3d.registry import RegistryError, category_of, find, register, registered
from lift3d.utils.base import BaseModule


class _Guid(BaseModule):
    category = "guidance-test-cat"


def test_register_and_find_by_name_and_category():
    @register("reg-test-alpha")
    class Alpha(_Guid):
        pass

    assert find("reg-test-alpha") is Alpha
    assert find("reg-test-alpha", "guidance-test-cat") is Alpha
    assert category_of(Alpha) == "guidance-test-cat"
    assert "reg-test-alpha" in registered("guidance-test-cat")


def test_duplicate_name_names_both_classes_and_modules():
    @register("reg-test-dup")
    class First(_Guid):
        pass

    with pytest.raises(RegistryError) as err:

        @register("reg-test-dup")
        class Second(_Guid):
            pass

    msg = str(err.value)
    assert "First" in msg and "Second" in msg and __name__ in msg and "reg-test-dup" in msg


def test_unknown_name_lists_category_and_closest_match():
    @register("reg-test-volume-renderer")
    class R(_Guid):
        pass

    with pytest.raises(RegistryError) as err:
        find("reg-test-volum-renderer", "guidance-test-cat")
    msg = str(err.value)
    assert "Did you mean 'reg-test-volume-renderer'" in msg
    assert "Registered in category 'guidance-test-cat'" in msg


def test_wrong_category_is_explained():
    @register("reg-test-wrongcat")
    class W(_Guid):
        pass

    with pytest.raises(RegistryError, match="registered, but as a 'guidance-test-cat', not a 'geometry'"):
        find("reg-test-wrongcat", "geometry")


@pytest.mark.parametrize("bad", ["CamelCase", "snake_case", "trailing-", "", "two--dashes"])
def test_names_must_be_kebab_case(bad):
    with pytest.raises(RegistryError, match="kebab-case"):
        register(bad)
