"""Row labels: who was distilled from what, from the pretraining setting a run records
(`pretrain.setting.setting_from_config`), or from a labels file for checkpoints made elsewhere."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

SIZE_LETTERS = {"tiny": "tiny", "small": "S", "base": "B", "large": "L", "huge": "H"}


@dataclass(frozen=True)
class Setting:
    """A row: who was distilled from what. `asym` True = MAE-style encoder-decoder, False = BEiT-style."""

    student: str
    teacher: str
    asym: bool | None = None

    @property
    def key(self) -> tuple:
        return (self.student, self.teacher, self.asym)

    def asym_text(self) -> str:
        return "?" if self.asym is None else "yes" if self.asym else "no"

    def name(self) -> str:
        return f"{self.student} / {self.teacher}"


@functools.cache
def presets() -> dict[str, dict]:
    """core.vit.PRESETS, imported on first use (it pulls in torch; the table itself does not need it)."""
    from core.vit import PRESETS

    return PRESETS


def vit_short(size: str | None) -> str:
    return f"ViT-{SIZE_LETTERS.get(size, size)}" if size else "ViT-?"


def vit_name(size: str | None, patch: int | None = None) -> str:
    """ "ViT-B/16" for a preset size (the preset's patch unless given)."""
    if patch is None and size in presets():
        patch = presets()[size]["patch_size"]
    return vit_short(size) + (f"/{patch}" if patch else "")


def timm_label(name: str | None) -> str:
    """ "CLIP-B/16" for timm's CLIP ViTs (vit_base_patch16_clip_224.openai), else the timm name."""
    if not name:
        return "timm ?"
    m = re.match(r"vit_(\w+?)_patch(\d+)_clip", name)
    sizes = {"base": "B", "large": "L", "huge": "H", "small": "S"}
    if m and m.group(1) in sizes:
        return f"CLIP-{sizes[m.group(1)]}/{m.group(2)}"
    return name


def first_target_label(setting: dict) -> str:
    """ "random ViT-B" (dBOT's start), "ViT-L" (a pretrained teacher), "pixels", "HOG", "EMA", "CLIP-B/16"."""
    first, teacher = setting.get("first_target") or {}, setting.get("teacher") or {}
    kind = first.get("kind")
    if kind == "teacher":
        return ("random " if first.get("random") else "") + vit_short(teacher.get("size"))
    if kind == "pixels":
        return "pixels" if first.get("norm_pix") is not False else "pixels (raw)"
    if kind == "timm":
        return timm_label(first.get("timm_name"))
    return {"hog": "HOG", "ema": "EMA"}.get(kind, str(kind))


def teacher_label(setting: dict) -> str:
    """The teacher setting of the encoder a pretraining setting describes.

    Stage 0 (or no bootstrapping): the first target. Later stages distil from the previous student:
    "ViT-B (bootstrapped)" when the run started from a random teacher (dBOT), "<first> + bootstrapped" otherwise;
    "x2", "x3" for more than one bootstrapping stage.
    """
    first, stage = first_target_label(setting), int(setting.get("stage", 0))
    if stage == 0 or not setting.get("bootstrap", True):
        return first
    times = "" if stage == 1 else f" x{stage}"
    if (setting.get("first_target") or {}).get("random"):
        return f"{vit_short((setting.get('student') or {}).get('size'))} (bootstrapped{times})"
    return f"{first} + bootstrapped{times}"


def setting_row(setting: dict) -> Setting:
    """The row of a pretraining setting: a stage's student, or (weights "teacher") the stage-0 target itself."""
    student = setting.get("student") or {}
    asym = student.get("kind") != "beit"
    if setting.get("weights") == "teacher":
        return Setting(
            vit_name((setting.get("teacher") or {}).get("size")),
            f"none (the stage-0 target {first_target_label(setting)} itself)",
            asym,
        )
    return Setting(vit_name(student.get("size"), student.get("patch_size")), teacher_label(setting), asym)


def setting_text(setting: dict) -> str:
    """ "stage-1 student" / "stage-0 teacher" for the provenance."""
    return f"stage-{setting.get('stage', 0)} {'teacher' if setting.get('weights') == 'teacher' else 'student'}"


def load_labels(path: str | Path | None) -> dict[str, Setting]:
    """`--labels` file: checkpoint path / file name / sha256 prefix -> Setting. Errors name the entry."""
    if path is None:
        return {}
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--labels {path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--labels {path}: expected a mapping 'checkpoint or sha256: {{student, teacher}}'")
    out = {}
    for k, v in doc.items():
        if not isinstance(v, dict) or not isinstance(v.get("student"), str) or not isinstance(v.get("teacher"), str):
            raise ValueError(
                f"--labels {path}: entry {k!r} needs 'student' and 'teacher' strings (and optionally asym: "
                f"true|false), got {v!r}"
            )
        asym = v.get("asym", True)
        if not isinstance(asym, bool):
            raise ValueError(f"--labels {path}: entry {k!r}: asym must be true or false, got {asym!r}")
        out[str(k)] = Setting(v["student"], v["teacher"], asym)
    return out


def label_from_results(data: dict, model: str | None) -> Setting | None:
    """A `label` in results.json: {student, teacher[, asym]} or "STUDENT | TEACHER" or just "TEACHER"."""
    lab = data.get("label")
    if isinstance(lab, dict) and isinstance(lab.get("student"), str) and isinstance(lab.get("teacher"), str):
        return Setting(lab["student"], lab["teacher"], lab.get("asym", True))
    if isinstance(lab, str) and lab.strip():
        student, sep, teacher = lab.partition("|")
        if sep:
            return Setting(student.strip(), teacher.strip(), True)
        return Setting(vit_name(model), lab.strip(), True)
    return None
