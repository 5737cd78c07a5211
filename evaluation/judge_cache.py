"""The judge, trained once per dataset and training recipe and cached in a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation.judge import Judge, JudgeConfig, JudgeTrainConfig
from evaluation.real_data import RealData
from training.serialization import atomic_write_text

JUDGE_REPORT = "judge_report.json"


def load_or_train_judge(
    cache_dir: str | Path,
    data: RealData,
    train_config: JudgeTrainConfig | None = None,
    resolution: int | None = None,
    channels: list[int] | None = None,
) -> tuple[Judge, dict[str, Any]]:
    """The judge cached in `cache_dir` if it was trained the same way on the same data, else
    train and save it. Returns the judge and its training report (held-out accuracy, seconds).
    `resolution`: the judge's input size; default the data's own, so nothing is resampled."""
    cache_dir = Path(cache_dir)
    cfg = train_config or JudgeTrainConfig()
    model_cfg = JudgeConfig(
        num_classes=len(data.class_names),
        class_names=list(data.class_names),
        resolution=resolution or data.resolution,
        dataset=f"{data.name}@{data.resolution}",
    )
    if channels is not None:
        model_cfg.channels = list(channels)
    report_path = cache_dir / JUDGE_REPORT
    if report_path.is_file() and (cache_dir / "config.json").is_file():
        report = json.loads(report_path.read_text())
        judge = Judge.from_pretrained(str(cache_dir))
        if judge.config == model_cfg and report.get("train_config") == _plain(cfg):
            return judge, report
    judge = Judge(model_cfg)
    report = judge.train_on(data.train, cfg, heldout=data.heldout).as_dict()
    report["train_config"] = _plain(cfg)
    judge.save_pretrained(cache_dir)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    return judge, report


def _plain(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
