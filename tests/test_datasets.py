import re
import shutil
from pathlib import Path

import pytest

from cmssft.data.datasets import load_dataset, parse_sample_path
from cmssft.data.records import Modality
from cmssft.errors import DatasetError

SYSU_FILE = re.compile(r"/cam([1-6])/(\d{4})/\d{4}\.jpg$")


def read_ids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().strip().split(",")]


# ----------------------------------------------------------------------------- SYSU-MM01


def test_sysu_loader_reads_generated_tree(sysu_root):
    data = load_dataset("sysu_mm01", sysu_root)
    train_ids = set(read_ids(sysu_root / "exp/train_id.txt")) | set(read_ids(sysu_root / "exp/val_id.txt"))
    test_ids = set(read_ids(sysu_root / "exp/test_id.txt"))
    assert {s.pid for s in data.train} == train_ids
    assert {s.pid for s in data.query} == {s.pid for s in data.gallery} == test_ids
    for sample in data.train + data.query + data.gallery:
        match = SYSU_FILE.search(sample.path)
        assert match, sample.path
        assert int(match.group(1)) == sample.camid and int(match.group(2)) == sample.pid
        assert sample.modality == (Modality.IR if sample.camid in (3, 6) else Modality.RGB)
    assert all(s.camid in (3, 6) for s in data.query)
    assert all(s.camid in (1, 2, 4, 5) for s in data.gallery)
    assert not data.val_query


def test_sysu_training_labels_are_contiguous_in_pid_order(sysu_root):
    data = load_dataset("sysu_mm01", sysu_root)
    pairs = sorted({(s.pid, s.label) for s in data.train})
    assert [label for _, label in pairs] == list(range(len(pairs)))
    assert data.num_train_ids == len(pairs)


def test_sysu_candidates_follow_the_protocol_order(sysu_root):
    """id ascending, camera ascending (3 before 6), files sorted: the order the protocols draw in."""
    data = load_dataset("sysu_mm01", sysu_root)
    for samples in (data.query, data.gallery):
        keys = [(s.pid, s.camid, Path(s.path).name) for s in samples]
        assert keys == sorted(keys)


def test_sysu_train_only_holds_val_out(sysu_root):
    data = load_dataset("sysu_mm01", sysu_root, train_ids="train")
    val_ids = set(read_ids(sysu_root / "exp/val_id.txt"))
    assert val_ids.isdisjoint({s.pid for s in data.train})
    assert {s.pid for s in data.val_query} == val_ids
    assert {s.pid for s in data.val_gallery} == val_ids


def test_sysu_missing_camera_is_named(sysu_root, tmp_path):
    broken = tmp_path / "SYSU"
    shutil.copytree(sysu_root, broken)
    shutil.rmtree(broken / "cam5")
    with pytest.raises(DatasetError, match=r"lacks cam5; expected SYSU-MM01 layout"):
        load_dataset("sysu_mm01", broken)


def test_sysu_bad_id_file_names_entry(sysu_root, tmp_path):
    broken = tmp_path / "SYSU"
    shutil.copytree(sysu_root, broken)
    (broken / "exp/test_id.txt").write_text("1,2,x3\n")
    with pytest.raises(DatasetError, match=r"test_id.txt: entry 3 \('x3'\)"):
        load_dataset("sysu_mm01", broken)


def test_sysu_wrong_root_names_layout(tmp_path):
    with pytest.raises(DatasetError, match="expected SYSU-MM01 layout"):
        load_dataset("sysu_mm01", tmp_path / "missing")


def test_sysu_path_parser():
    sample = parse_sample_path("sysu_mm01", "/data", "cam3/0006/0001.jpg")
    assert (sample.pid, sample.camid, sample.modality) == (6, 3, Modality.IR)
    assert sample.path == "/data/cam3/0006/0001.jpg"
    with pytest.raises(DatasetError):
        parse_sample_path("sysu_mm01", "/data", "cam7/0006/0001.jpg")


# ----------------------------------------------------------------------------- RegDB


def test_regdb_loader_reads_generated_tree(regdb_root):
    for trial in (1, 10):
        data = load_dataset("regdb", regdb_root, trial=trial)
        assert all(Path(s.path).is_file() for s in data.train + data.query + data.gallery)
        assert {s.pid for s in data.train}.isdisjoint({s.pid for s in data.query})
        assert all(s.modality == Modality.RGB for s in data.query)
        assert all(s.modality == Modality.IR for s in data.gallery)
        assert len(data.query) == len(data.gallery)
        labels = sorted({s.label for s in data.train})
        assert labels == list(range(len(labels)))


def test_regdb_on_the_real_idx_files(split_files, tmp_path):
    """The real split files: 2,060 query and 2,060 gallery images of 206 identities per trial."""
    root = tmp_path / "RegDB"
    shutil.copytree(split_files / "regdb" / "idx", root / "idx")
    (root / "Visible").mkdir()
    (root / "Thermal").mkdir()
    for trial in range(1, 11):
        data = load_dataset("regdb", root, trial=trial)
        assert len(data.query) == 2060 and len(data.gallery) == 2060
        assert len({s.pid for s in data.query}) == 206 == len({s.pid for s in data.gallery})
        assert data.num_train_ids == 206 and len(data.train) == 4120
        # thermal files mirror visible line by line
        assert [s.pid for s in data.query] == [s.pid for s in data.gallery]
        assert {s.pid for s in data.train}.isdisjoint({s.pid for s in data.query})


def test_regdb_bad_line_names_file_and_line(regdb_root, tmp_path):
    broken = tmp_path / "RegDB"
    shutil.copytree(regdb_root, broken)
    path = broken / "idx/train_visible_2.txt"
    lines = path.read_text().splitlines()
    lines[2] = "Visible/whatever.bmp zero"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"train_visible_2.txt:3: expected '<path> <label>'"):
        load_dataset("regdb", broken, trial=2)


def test_regdb_trial_out_of_range(regdb_root):
    with pytest.raises(DatasetError, match="1..10"):
        load_dataset("regdb", regdb_root, trial=11)


def test_regdb_path_parser():
    sample = parse_sample_path("regdb", "/d", "Thermal/88/female_back_t_01102_88.bmp")
    assert (sample.pid, sample.camid, sample.modality) == (88, 2, Modality.IR)


# ----------------------------------------------------------------------------- custom manifests


def write_manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("path,pid,camid,modality,split\n" + "\n".join(rows) + "\n")
    return path


def test_custom_manifest(tmp_path):
    rows = [
        "a/1.jpg,10,1,rgb,train",
        "a/2.jpg,10,2,ir,train",
        "b/1.jpg,7,1,visible,train",
        "b/2.jpg,7,2,thermal,train",
        "q/1.jpg,3,2,ir,query",
        "g/1.jpg,3,1,rgb,gallery",
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    data = load_dataset("custom", tmp_path, manifest=str(manifest))
    assert [(s.pid, s.label) for s in data.train] == [(10, 1), (10, 1), (7, 0), (7, 0)]
    assert data.query[0].path == str(tmp_path / "q/1.jpg")
    assert data.gallery[0].modality == Modality.RGB


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.jpg,x,1,rgb,train", r"m.csv:2: pid and camid must be integers"),
        ("a.jpg,1,1,uv,train", r"m.csv:2: modality 'uv'"),
        ("a.jpg,1,1,rgb,test", r"m.csv:2: split 'test'"),
    ],
)
def test_custom_manifest_errors_name_the_line(tmp_path, row, message):
    manifest = write_manifest(tmp_path / "m.csv", [row])
    with pytest.raises(DatasetError, match=message):
        load_dataset("custom", tmp_path, manifest=str(manifest))


def test_custom_manifest_missing_column(tmp_path):
    (tmp_path / "m.csv").write_text("path,pid,split\n")
    with pytest.raises(DatasetError, match="lacks column"):
        load_dataset("custom", tmp_path, manifest=str(tmp_path / "m.csv"))
