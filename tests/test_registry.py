import pytest

from cmssft.data.datasets import load_dataset
from cmssft.errors import UserError
from cmssft.registry import DATASETS, Registry


def test_builtin_datasets_are_registered():
    assert {"sysu_mm01", "regdb", "custom"} <= set(DATASETS.names())


def test_unknown_name_lists_registered_ones():
    with pytest.raises(UserError, match="registered: custom, llcm, regdb, sysu_mm01"):
        load_dataset("market", "/nowhere")


def test_duplicate_registration_is_refused():
    reg: Registry = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(ValueError):
        reg.register("a")(object)
