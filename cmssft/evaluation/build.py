"""Config -> protocol: which protocol a config asks for, built on a loaded dataset.

Both entry points use it: ``eval.py`` (:mod:`cmssft.evaluation.cli`) and training-time
evaluation (:mod:`cmssft.engine.evaluate`).
"""

from __future__ import annotations

from cmssft.config import Config
from cmssft.data.records import CrossModalDataset
from cmssft.errors import UserError
from cmssft.evaluation import protocols as P

PROTOCOL_DATASET = {"sysu": "sysu_mm01", "sysu-official": "sysu_mm01", "regdb": "regdb", "llcm": "llcm",
                    "custom": "custom"}
AUTO_PROTOCOL = {"sysu_mm01": "sysu", "regdb": "regdb", "llcm": "llcm", "custom": "custom"}


def resolve_protocol(cfg: Config) -> str:
    """``eval.protocol`` with ``auto`` mapped from the dataset; a mismatch is a user error."""
    name = cfg.eval.protocol
    if name == "auto":
        if cfg.data.name not in AUTO_PROTOCOL:
            raise UserError(f"no default protocol for dataset {cfg.data.name!r}; pass --protocol")
        return AUTO_PROTOCOL[cfg.data.name]
    if PROTOCOL_DATASET[name] != cfg.data.name:
        raise UserError(f"protocol {name} evaluates {PROTOCOL_DATASET[name]}, but data.name is "
                        f"{cfg.data.name!r}")
    return name


def build_protocol(
    cfg: Config,
    dataset: CrossModalDataset,
    name: str,
    *,
    perm_path: str | None = None,
    exclusion: str = "same_camera",
) -> P.Protocol:
    """The protocol ``name`` on ``dataset`` with the settings of ``cfg.eval`` (RegDB: ``cfg.data.trial``)."""
    e = cfg.eval
    if name == "sysu":
        if e.shots != 1:
            raise UserError("the community SYSU-MM01 protocol is single-shot; use --protocol sysu-official "
                            "for multi-shot (--shots 10)")
        return P.sysu_community(dataset, e.mode, e.trials)
    if name == "sysu-official":
        return P.sysu_official(dataset, perm_path, e.mode, e.shots, e.trials)
    if name == "regdb":
        return P.regdb(dataset, cfg.data.trial, e.direction)
    if name == "llcm":
        return build_llcm(cfg, dataset)
    return P.custom(dataset, exclusion)


def build_llcm(cfg: Config, dataset: CrossModalDataset) -> P.Protocol:
    """LLCM takes only a direction and a number of trials; SYSU-MM01's search options are mistakes here."""
    e = cfg.eval
    if e.shots != 1:
        raise UserError(f"the LLCM protocol is single-shot; --shots {e.shots} is for --protocol sysu-official")
    if e.mode != "all":
        raise UserError(f"--mode {e.mode} is a SYSU-MM01 search mode; LLCM takes --direction ir2vis|vis2ir")
    return P.llcm(dataset, e.trials, e.direction)  # type: ignore[arg-type]  (RegDB directions raise there)
