"""Planning and writing a synthetic dataset; the public entry points live here.

Each image's random stream comes from ``(seed, pid, camera, index)`` alone, so
the bytes written do not depend on the number of workers or the order of work.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cmssft.config import SyntheticConfig
from cmssft.data.records import Modality
from cmssft.data.synthetic import layouts
from cmssft.data.synthetic.layouts import PlannedFile
from cmssft.data.synthetic.render import camera_style, draw_geometry, render_image
from cmssft.data.synthetic.traits import TAG_FRAME, TAG_IMAGE, difficulty_params, make_identity
from cmssft.errors import UserError

LAYOUTS = ("sysu", "regdb", "llcm")
LAYOUT_ALIASES = {"sysu": "sysu", "sysu_mm01": "sysu", "sysu-mm01": "sysu", "regdb": "regdb", "llcm": "llcm"}
DEFAULT_IDS = {"sysu": 32, "regdb": 40, "llcm": 24}
MIN_IDS = {"sysu": 6, "regdb": 2, "llcm": 4}
MAX_IDS = 100_000
JPEG_QUALITY = 92
MIN_SIZE, MAX_SIZE = 16, 2048
LAYOUT_ENTRIES = {
    "sysu": tuple(f"cam{c}" for c in layouts.SYSU_CAMERAS) + ("exp",),
    "regdb": ("Visible", "Thermal", "idx"),
    "llcm": ("vis", "nir", "test_vis", "test_nir", "idx"),
}


@dataclass(frozen=True)
class Spec:
    """Validated generation settings (what the layout and the pixels depend on)."""

    layout: str
    ids: int | None
    height: int
    width: int
    seed: int
    difficulty: float
    like_sysu: bool


@dataclass
class GenerationReport:
    """What :func:`generate_dataset` wrote and how fast."""

    root: Path
    layout: str
    num_ids: int
    num_rgb: int
    num_ir: int
    seconds: float
    workers: int = 1

    @property
    def num_images(self) -> int:
        return self.num_rgb + self.num_ir

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def make_spec(
    layout: str,
    *,
    ids: int | None = None,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    like_sysu: bool = False,
) -> Spec:
    """Check the arguments once, with messages a user can act on."""
    name = LAYOUT_ALIASES.get(str(layout).lower())
    if name is None:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if like_sysu and name != "sysu":
        raise UserError("--like-sysu only applies to --layout sysu")
    if like_sysu and ids is not None:
        raise UserError("--like-sysu uses the real 513 identity folders; drop --ids")
    if ids is not None and not (MIN_IDS[name] <= int(ids) <= MAX_IDS):
        raise UserError(f"--ids for layout {name} must be in {MIN_IDS[name]}..{MAX_IDS}, got {ids}")
    for label, value in (("height", height), ("width", width)):
        if not MIN_SIZE <= int(value) <= MAX_SIZE:
            raise UserError(f"image {label} must be in {MIN_SIZE}..{MAX_SIZE} pixels, got {value}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise UserError(f"--difficulty must be in [0, 1], got {difficulty}")
    if int(seed) < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    count = None if like_sysu else int(ids if ids is not None else DEFAULT_IDS[name])
    return Spec(name, count, int(height), int(width), int(seed), float(difficulty), bool(like_sysu))


def _regdb_identities(spec: Spec) -> list[layouts.RegDBIdentity]:
    params = difficulty_params(spec.difficulty)
    assert spec.ids is not None
    return [
        layouts.regdb_identity(pid, make_identity(spec.seed, pid, params).female, spec.seed)
        for pid in range(1, spec.ids + 1)
    ]


def _sysu_tables(spec: Spec) -> tuple[dict[int, tuple[int, ...]], dict[str, list[int]]]:
    if spec.like_sysu:
        return layouts.real_sysu_counts(), layouts.real_sysu_splits()
    assert spec.ids is not None
    return layouts.small_sysu_counts(spec.ids, spec.seed), layouts.small_sysu_splits(spec.ids, spec.seed)


def _llcm_plan(spec: Spec) -> tuple[list[PlannedFile], list[int]]:
    assert spec.ids is not None
    _, test_ids = layouts.small_llcm_split(spec.ids, spec.seed)
    return layouts.plan_llcm(layouts.llcm_recordings(spec.ids, spec.seed), test_ids), test_ids


def _plan(spec: Spec) -> list[PlannedFile]:
    if spec.layout == "regdb":
        return layouts.plan_regdb(_regdb_identities(spec))
    if spec.layout == "llcm":
        return _llcm_plan(spec)[0]
    return layouts.plan_sysu(*_sysu_tables(spec))


def _metadata(spec: Spec) -> dict[str, str]:
    if spec.layout == "regdb":
        return layouts.regdb_index_texts(_regdb_identities(spec), spec.seed)
    if spec.layout == "llcm":
        return layouts.llcm_index_texts(*_llcm_plan(spec))
    return layouts.sysu_split_texts(_sysu_tables(spec)[1])


def plan_dataset(
    layout: str,
    *,
    ids: int | None = None,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    like_sysu: bool = False,
) -> list[PlannedFile]:
    """The images :func:`generate_dataset` would write, without rendering (full-size shapes in ms)."""
    return _plan(make_spec(layout, ids=ids, height=height, width=width, seed=seed, difficulty=difficulty,
                           like_sysu=like_sysu))  # fmt: skip


def plan_metadata(
    layout: str,
    *,
    ids: int | None = None,
    seed: int = 0,
    difficulty: float = 0.5,
    like_sysu: bool = False,
) -> dict[str, str]:
    """The text files (``exp/*_id.txt`` or ``idx/*.txt``) as relative path -> content."""
    return _metadata(make_spec(layout, ids=ids, seed=seed, difficulty=difficulty, like_sysu=like_sysu))


# --------------------------------------------------------------------------- rendering


def render_file(spec: Spec, f: PlannedFile, context: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one planned image: (BGR uint8 image, boolean person mask).

    ``context`` caches per-dataset work (difficulty parameters, identities, camera styles) across
    calls; it changes no pixel.
    """
    cache = {} if context is None else context
    if "params" not in cache:
        cache["params"] = difficulty_params(spec.difficulty)
    params = cache["params"]
    if ("id", f.pid) not in cache:
        cache[("id", f.pid)] = make_identity(spec.seed, f.pid, params)
    ident = cache[("id", f.pid)]
    if ("cam", f.camera, f.modality) not in cache:  # LLCM: one camera number, two modalities
        indoor = spec.layout == "sysu" and f.camera in layouts.SYSU_INDOOR
        cache[("cam", f.camera, f.modality)] = camera_style(spec.seed, f.camera, f.modality, indoor, params)
    style = cache[("cam", f.camera, f.modality)]
    entropy = [spec.seed, TAG_IMAGE, f.pid, f.camera, f.index]
    if spec.layout == "llcm":  # day (visible) and night (NIR) images of one camera are different moments
        entropy.append(int(f.modality))
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    if spec.layout == "regdb":  # a visible/thermal pair is one moment seen by two sensors
        view = layouts.regdb_identity(f.pid, ident.female, spec.seed).view
        frame_rng = np.random.default_rng(np.random.SeedSequence([spec.seed, TAG_FRAME, f.pid, f.index]))
        geometry = draw_geometry(frame_rng, style, params, view=view)
    else:
        geometry = draw_geometry(rng, style, params)
    return render_image(ident, style, geometry, rng, params, spec.height, spec.width)


def _encode(image: np.ndarray, path: str) -> bytes:
    if path.endswith(".jpg"):
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        ok, data = cv2.imencode(".bmp", image)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    return data.tobytes()


def _write_group(spec: Spec, root: str, files: list[PlannedFile]) -> int:
    """Render and write one identity's images (one unit of work for the process pool)."""
    context: dict = {}
    for f in files:
        image, _ = render_file(spec, f, context)
        (Path(root) / f.path).write_bytes(_encode(image, f.path))
    return len(files)


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _groups(files: list[PlannedFile]) -> list[list[PlannedFile]]:
    by_pid: dict[int, list[PlannedFile]] = {}
    for f in files:
        by_pid.setdefault(f.pid, []).append(f)
    return list(by_pid.values())


def _render_all(spec: Spec, root: Path, files: list[PlannedFile], workers: int, progress: bool) -> None:
    groups = _groups(files)
    bar = tqdm(total=len(files), unit="img", desc=f"synthetic {spec.layout}", disable=not progress)
    with bar:
        if workers <= 1:
            for group in groups:
                bar.update(_write_group(spec, str(root), group))
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [pool.submit(_write_group, spec, str(root), group) for group in groups]
            for future in as_completed(futures):
                bar.update(future.result())


def _write_text_files(root: Path, texts: dict[str, str]) -> None:
    for rel, content in texts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, newline="\n")


def generate_dataset(
    layout: str,
    out: str | Path,
    *,
    ids: int | None = None,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
    like_sysu: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> GenerationReport:
    """Write a synthetic dataset at ``out`` in the real layout, so the real loaders read it unchanged.

    Files already at ``out`` with the same names are overwritten; the CLI refuses a non-empty folder.
    """
    spec = make_spec(layout, ids=ids, height=height, width=width, seed=seed, difficulty=difficulty,
                     like_sysu=like_sysu)  # fmt: skip
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a folder")
    start = time.perf_counter()
    files = _plan(spec)
    for folder in sorted({str(Path(f.path).parent) for f in files}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _render_all(spec, root, files, int(workers), progress)
    _write_text_files(root, _metadata(spec))
    if spec.layout == "sysu":
        (root / "exp" / "rand_perm_cam.mat").write_bytes(layouts.rand_perm_cam_bytes(files, spec.seed))
    num_rgb = sum(f.modality == Modality.RGB for f in files)
    return GenerationReport(
        root=root,
        layout=spec.layout,
        num_ids=len({f.pid for f in files}),
        num_rgb=num_rgb,
        num_ir=len(files) - num_rgb,
        seconds=time.perf_counter() - start,
        workers=int(workers),
    )


def is_empty_dir(path: Path) -> bool:
    """True when ``path`` is missing or an empty folder."""
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def ensure_synthetic(root: Path, layout: str, cfg: SyntheticConfig) -> bool:
    """Generate the configured synthetic dataset at ``root`` if it is missing or empty.

    Returns True when it generated. Does nothing (False) when ``cfg.enabled`` is off or ``root``
    already holds files, so a user's real data is never touched. The tree is written into a
    private sibling folder and renamed into place only when complete, so a crash never leaves a
    partial tree behind, and runs started together (an ablation's parallel seeds) each either
    install a whole tree or find the one another run installed.
    """
    root = Path(root)
    if not cfg.enabled or not is_empty_dir(root):
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        generate_dataset(layout, staging, ids=cfg.ids, height=cfg.height, width=cfg.width, seed=cfg.seed,
                         difficulty=cfg.difficulty, progress=True)  # fmt: skip
        return _install(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, root: Path) -> bool:
    """Rename a finished tree onto ``root`` (missing or empty); False when another run got there first."""
    if root.is_dir() and not any(root.iterdir()):
        try:
            root.rmdir()
        except OSError:  # another run removed or filled it meanwhile
            pass
    try:
        staging.rename(root)
    except OSError:
        if is_empty_dir(root):
            raise
        return False
    return True
