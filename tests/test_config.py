import textwrap

import pytest

from cmssft.config import Config, config_to_dict, load_config, parse_override, save_config
from cmssft.errors import ConfigError


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_without_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.data.name == "sysu_mm01"


def test_base_inheritance_merges_sections(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochs: 7\n  lr: 0.5\ndata:\n  height: 64\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 7  # inherited
    assert cfg.train.lr == pytest.approx(3e-4)  # overridden, and '3e-4' read as a float
    assert cfg.data.height == 64


def test_base_is_resolved_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "seed: 5\n")
    child = write(tmp_path / "sub" / "child.yaml", "_base_: ../base.yaml\n")
    assert load_config(child).seed == 5


def test_only_one_level_of_base(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    c = write(tmp_path / "c.yaml", "_base_: b.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(c)


def test_dotted_overrides_win_over_file(tmp_path):
    f = write(tmp_path / "c.yaml", "train:\n  epochs: 3\n")
    cfg = load_config(f, ["train.epochs=2", "data.root=/x", "train.milestones=[4, 8]", "model.sstn.topk=3"])
    assert cfg.train.epochs == 2
    assert cfg.data.root == "/x"
    assert cfg.train.milestones == [4, 8]
    assert cfg.model.sstn.topk == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "did you mean 'train'"),
        ("lr=1", "did you mean 'train.lr'"),
        ("train.epochs=abc", "train.epochs: expected int, got 'abc'"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("train.amp=fp17", "did you mean 'fp16'"),
        ("data.flip=true", "data.flip: expected float"),
        ("train.deterministic=3", "train.deterministic: expected bool"),
        ("novalue", "not of the form"),
        ("a..b=1", "not of the form"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_in_file_names_file_key(tmp_path):
    f = write(tmp_path / "c.yaml", "data:\n  hieght: 64\n")
    with pytest.raises(ConfigError, match=r"data\.hieght.*data\.height"):
        load_config(f)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = write(tmp_path / "scalar.yaml", "3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "model.sstn.topk=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", "")


def test_every_shipped_config_loads():
    from tests.conftest import REPO_ROOT

    paths = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("word", ["off", "on", "no", "yes", "Off", "NO"])
def test_yaml_1_1_boolean_words_stay_words(word):
    """YAML 1.1 would read these as booleans; a person typing them means the word."""
    assert parse_override(f"a={word}") == ("a", word)
    assert parse_override("a=false") == ("a", False)


def test_off_reaches_string_keys_from_overrides_and_files(tmp_path):
    cfg = load_config(None, ["model.sstn.test_mode=off", "train.amp=off"])
    assert (cfg.model.sstn.test_mode, cfg.train.amp) == ("off", "off")
    path = tmp_path / "off.yaml"
    path.write_text("model:\n  sstn:\n    test_mode: off\ntrain:\n  amp: off\n")
    cfg = load_config(path)
    assert (cfg.model.sstn.test_mode, cfg.train.amp) == ("off", "off")
    save_config(cfg, tmp_path / "saved.yaml")  # and the saved run config reads back the same
    assert load_config(tmp_path / "saved.yaml").model.sstn.test_mode == "off"


@pytest.mark.parametrize("word, value", [("on", True), ("yes", True), ("true", True), ("off", False), ("no", False)])
def test_boolean_keys_take_the_words_as_booleans(tmp_path, word, value):
    assert load_config(None, [f"train.deterministic={word}"]).train.deterministic is value
    path = tmp_path / "b.yaml"
    path.write_text(f"data:\n  cache: {word}\n")
    assert load_config(path).data.cache is value


def test_a_word_that_is_no_boolean_is_refused_for_a_boolean_key():
    with pytest.raises(ConfigError, match="train.deterministic: expected bool, got 'maybe'"):
        load_config(None, ["train.deterministic=maybe"])


def test_cross_k_defaults_to_all_neighbours_and_must_fit_in_topk():
    from cmssft.models import build_model

    cfg = load_config(None, ["model.sstn.topk=4", "model.backbone=resnet18", "model.pretrained=none"])
    assert cfg.model.sstn.cross_k == -1
    assert build_model(cfg, 3).sstn.cross_k == 4  # -1: every kept neighbour from the other modality
    with pytest.raises(ConfigError, match=r"model.sstn.cross_k: 5 is more than model.sstn.topk=4; allowed: \[-1, 4\]"):
        load_config(None, ["model.sstn.topk=4", "model.sstn.cross_k=5"])
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, ["model.sstn.cross_k=-2"])


def test_test_intra_k_reaches_the_sstn_and_is_at_least_0():
    from cmssft.models import build_model

    base = ["model.backbone=resnet18", "model.pretrained=none"]
    assert build_model(load_config(None, base), 3).sstn.test_view().topk == 6  # default 0: test rows as training
    sstn = build_model(load_config(None, [*base, "model.sstn.test_intra_k=4"]), 3).sstn
    assert (sstn.topk, sstn.test_view().topk) == (6, 10)
    with pytest.raises(ConfigError, match="model.sstn.test_intra_k: -1 is out of range"):
        load_config(None, ["model.sstn.test_intra_k=-1"])


@pytest.mark.parametrize("name", ["sysu_mm01", "regdb", "llcm"])
def test_real_data_configs_print_single_query_first_and_transductive_beside_it(name):
    """Inductive single-query numbers are what AGW, CAJ and most papers report: they come first."""
    from tests.conftest import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert cfg.model.sstn.test_mode == "single_query"
    assert cfg.eval.compare_modes == ["transductive", "off"]
