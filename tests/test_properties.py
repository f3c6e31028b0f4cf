"""Property tests: whatever a user feeds the parsers, the answer is a result or a UserError, never a crash."""

from __future__ import annotations

import dataclasses
import io
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cmssft.config import Config, config_from_dict, load_config, parse_override
from cmssft.data.datasets import load_dataset
from cmssft.data.datasets.regdb import read_index
from cmssft.data.records import Modality, Sample
from cmssft.errors import UserError
from cmssft.evaluation.features_io import bank_from_features, load_features, save_features

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(schema_keys(hints[f.name], prefix + f.name + "."))
    return keys


KEYS = schema_keys()
NAMES = sorted({part for key in KEYS for part in key.split(".")})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["sgd", "adam", "resnet18", "softmax", "all", "auto", "v2t", "3e-4", "1e999", "-1", "0", "nan"]),
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=10), st.integers(-3, 3))
nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=5)), max_leaves=20)


def answers_or_user_error(call, *args):
    """Run ``call``; a UserError is a fine answer, anything else fails the property."""
    try:
        return call(*args)
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


# --------------------------------------------------------------------------- config


@SETTINGS
@given(st.dictionaries(st.sampled_from(["data", "model", "loss", "train", "eval", "seed", "output_dir"]) | keys,
                       nested, max_size=6))
def test_config_from_any_nested_dict(raw):
    cfg = answers_or_user_error(config_from_dict, raw)
    assert cfg is None or isinstance(cfg, Config)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), scalars, min_size=1, max_size=4))
def test_config_from_real_keys_with_any_values(values):
    raw: dict = {}
    for key, value in values.items():
        node = raw
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else {}
        node[leaf] = value
    cfg = answers_or_user_error(config_from_dict, raw)
    assert cfg is None or isinstance(cfg, Config)


YAML_BITS = st.sampled_from(["[1, 2", "{a: 1}", "!!binary AAAA", "*x", "&a [*a]", "1e999", "[[[[[[]]]]]]", "{",
                             ".nan", "-.inf", "0x10", "~", "2001-01-01", "!!python/object:os.system ls"])
override_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=30) | YAML_BITS),
)


@SETTINGS
@given(override_text)
def test_parse_override_any_string(item):
    out = answers_or_user_error(parse_override, item)
    assert out is None or (isinstance(out[0], str) and out[0])


@SETTINGS
@given(st.lists(override_text, max_size=4))
def test_load_config_with_any_overrides(items):
    cfg = answers_or_user_error(load_config, None, items)
    assert cfg is None or isinstance(cfg, Config)


# --------------------------------------------------------------------------- split files and manifests

line_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda m, i, f, label: f"{m}/{i}/{f} {label}", st.sampled_from(["Visible", "Thermal", "Infrared", ""]),
              st.text("0123456789", max_size=4), st.text(max_size=8), st.text("-0123456789x ²", max_size=4)),
)


@SETTINGS
@given(st.lists(line_text, max_size=6) | st.binary(max_size=60).map(lambda b: [b]))
def test_regdb_idx_any_lines(scratch, lines):
    path = scratch / "idx.txt"
    if lines and isinstance(lines[0], bytes):
        path.write_bytes(lines[0])
    else:
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    samples = answers_or_user_error(read_index, scratch, path)
    assert samples is None or all(isinstance(s, Sample) for s in samples)


manifest_row = st.one_of(
    st.text(max_size=40),
    st.lists(st.text(max_size=8) | st.sampled_from(["rgb", "ir", "thermal", "train", "query", "gallery", "1", "-2",
                                                    "\x00", '"', "a.jpg"]), max_size=7).map(",".join),
)


@SETTINGS
@given(st.lists(manifest_row, max_size=5), st.booleans(), st.binary(max_size=20))
def test_custom_manifest_any_rows(scratch, rows, with_header, junk):
    manifest = scratch / "manifest.csv"
    header = ["path,pid,camid,modality,split"] if with_header else []
    text = "\n".join(header + rows)
    manifest.write_bytes(text.encode("utf-8", "surrogatepass") + (junk if not rows else b""))
    dataset = answers_or_user_error(lambda: load_dataset("custom", scratch, manifest=str(manifest)))
    assert dataset is None or dataset.name == "custom"


# --------------------------------------------------------------------------- features files

CANDIDATES = [Sample(f"/d/cam{c}/000{p}/0001.jpg", p, c, Modality.IR if c in (3, 6) else Modality.RGB)
              for p in (1, 2) for c in (1, 3)]
CANDIDATE_PATHS = [f"cam{c}/000{p}/0001.jpg" for p in (1, 2) for c in (1, 3)]


def load_and_gather(path: Path):
    """What eval.py does with a features file: load it, then gather the protocol's rows."""
    paths, feats = load_features(path)
    return bank_from_features(CANDIDATES, "/d", paths, feats, dataset_name="sysu_mm01")


@SETTINGS
@given(st.binary(max_size=200))
def test_features_any_bytes(scratch, data):
    path = scratch / "any.npz"
    path.write_bytes(data)
    answers_or_user_error(load_and_gather, path)


def valid_npz() -> bytes:
    buffer = io.BytesIO()
    save_features(buffer, CANDIDATE_PATHS, np.arange(8, dtype=np.float32).reshape(4, 2))
    return buffer.getvalue()


@SETTINGS
@given(st.data())
def test_features_damaged_npz(scratch, data):
    """A real features file, cut short or with bytes overwritten (zip and .npy headers included)."""
    raw = bytearray(valid_npz())
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = scratch / "damaged.npz"
    path.write_bytes(bytes(raw))
    answers_or_user_error(load_and_gather, path)


array = st.one_of(
    hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16]), st.tuples(st.just(4), st.integers(0, 3)),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=16)),
    st.just(np.array(CANDIDATE_PATHS)),
    st.just(np.array([p.encode() for p in CANDIDATE_PATHS] + [b"\xff"])),
    st.lists(st.sampled_from(CANDIDATE_PATHS + ["./cam1/0001/0001.jpg", "cam9/1/x.jpg", ""]), max_size=6).map(np.array),
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["paths", "features", "other"]), array, max_size=3), st.booleans())
def test_features_any_npz_contents(scratch, arrays, compressed):
    path = scratch / "contents.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    answers_or_user_error(load_and_gather, path)


def test_a_valid_features_file_still_loads(scratch):
    """The properties above must not pass by rejecting everything."""
    path = scratch / "valid.npz"
    path.write_bytes(valid_npz())
    assert zipfile.is_zipfile(path)
    bank = load_and_gather(path)
    assert bank.shape == (4, 2)
