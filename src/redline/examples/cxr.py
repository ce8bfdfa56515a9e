"""Procedural chest radiographs and their findings reports, for reportgen-tiny.

No real radiograph/report pairs can be downloaded where redline is developed (and none
ships in a package), so this module *generates* them, and says so wherever they appear.
Each case is drawn from a seeded generator, so the data is the same on every machine:

  findings  heart size (cardiothoracic ratio; above 0.5 is cardiomegaly), pleural effusion
            (none, left, right, both: a dense fluid level blunting the costophrenic angle),
            a pulmonary nodule (none, left, right), lower-lobe consolidation (none, left,
            right), a support device (none, a pacemaker, a central venous line)
  image     a 64x64 frontal view: body soft tissue, two radiolucent lung fields, the heart
            silhouette at its ratio, the findings drawn where they lie, exposure and noise
            varied case to case (patient 'left' is image right, as radiographs are read)
  report    the findings written in IU X-Ray's style, each in one of several phrasings, in a
            varied order ("The heart is normal in size. No pleural effusion. ...")

`read_findings` reads a report back into findings: the grammar is closed, so it is exact
(every phrasing maps to one finding), which is how clinical efficacy is scored here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SIZE = 64
SIDES = ("left", "right")
LABELS = ("cardiomegaly", "effusion_left", "effusion_right", "nodule_left", "nodule_right",
          "consolidation_left", "consolidation_right", "pacemaker", "line")
"""The binary findings clinical efficacy scores (a bilateral effusion is both sides)."""


@dataclass(frozen=True)
class Findings:
    cardiomegaly: bool = False
    effusion: str = "none"  # none | left | right | both
    nodule: str = "none"  # none | left | right
    consolidation: str = "none"  # none | left | right
    device: str = "none"  # none | pacemaker | line

    def labels(self) -> tuple[int, ...]:
        """The finding as a 0/1 vector over LABELS."""
        on = {"cardiomegaly": self.cardiomegaly, "pacemaker": self.device == "pacemaker",
              "line": self.device == "line"}
        for side in SIDES:
            on[f"effusion_{side}"] = self.effusion in (side, "both")
            on[f"nodule_{side}"] = self.nodule == side
            on[f"consolidation_{side}"] = self.consolidation == side
        return tuple(int(on[name]) for name in LABELS)


# ---- the report grammar: every phrasing of every finding ----------------------------------

PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("heart", "normal"): ("the heart is normal in size", "heart size is within normal limits",
                          "the cardiomediastinal silhouette is normal"),
    ("heart", "enlarged"): ("the heart is enlarged", "there is cardiomegaly",
                            "the cardiac silhouette is enlarged"),
    ("effusion", "none"): ("no pleural effusion", "there is no pleural effusion"),
    ("effusion", "left"): ("there is a small left pleural effusion",
                           "blunting of the left costophrenic angle suggests effusion"),
    ("effusion", "right"): ("there is a small right pleural effusion",
                            "blunting of the right costophrenic angle suggests effusion"),
    ("effusion", "both"): ("there are small bilateral pleural effusions",
                           "both costophrenic angles are blunted by effusions"),
    ("nodule", "none"): ("no suspicious pulmonary nodule", "no nodules are seen"),
    ("nodule", "left"): ("there is a nodule in the left lung",
                         "a small left pulmonary nodule is noted"),
    ("nodule", "right"): ("there is a nodule in the right lung",
                          "a small right pulmonary nodule is noted"),
    ("consolidation", "none"): ("no focal consolidation", "the lungs are clear"),
    ("consolidation", "left"): ("there is left lower lobe consolidation",
                                "patchy airspace opacity at the left base"),
    ("consolidation", "right"): ("there is right lower lobe consolidation",
                                 "patchy airspace opacity at the right base"),
    ("device", "pacemaker"): ("a cardiac pacemaker is in place",
                              "left chest wall pacemaker with leads in the heart"),
    ("device", "line"): ("a right central venous catheter is present",
                         "a central line terminates in the superior vena cava"),
    ("closing", "none"): ("no pneumothorax", "no acute osseous abnormality"),
}


def _values(f: Findings) -> list[tuple[str, str]]:
    return [("heart", "enlarged" if f.cardiomegaly else "normal"), ("effusion", f.effusion),
            ("nodule", f.nodule), ("consolidation", f.consolidation),
            *([("device", f.device)] if f.device != "none" else [])]


def write_report(f: Findings, rng: np.random.Generator) -> str:
    """A report of `f` in varied phrasing and order (the heart first, as radiologists do)."""
    parts = _values(f)
    rest = parts[1:]
    rng.shuffle(rest)  # type: ignore[arg-type]
    if rng.random() < 0.5:
        rest.append(("closing", "none"))
    sentences = [PHRASES[p][rng.integers(len(PHRASES[p]))] for p in [parts[0], *rest]]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


_LOOKUP = {phrase: key for key, phrases in PHRASES.items() for phrase in phrases}


def read_findings(report: str) -> Findings:
    """The findings a report states; a sentence outside the grammar is ignored (a model's
    garbled sentence states nothing), a category not mentioned is normal."""
    found: dict[str, str] = {}
    for sentence in re.split(r"\s*\.\s*", report.lower()):
        key = _LOOKUP.get(" ".join(sentence.split()))
        if key is not None:
            found.setdefault(key[0], key[1])
    return Findings(cardiomegaly=found.get("heart") == "enlarged",
                    effusion=found.get("effusion", "none"), nodule=found.get("nodule", "none"),
                    consolidation=found.get("consolidation", "none"),
                    device=found.get("device", "none"))


def vocabulary() -> list[str]:
    """Every word the grammar uses, and the full stop, in a fixed order."""
    words = {w for phrases in PHRASES.values() for p in phrases for w in p.split()}
    return [*sorted(words), "."]


def tokenize(report: str) -> list[str]:
    """Lower-case words and full stops: 'No effusion.' -> ['no', 'effusion', '.']."""
    return re.findall(r"[a-z]+|\.", report.lower())


# ---- the images ------------------------------------------------------------------------------

def draw_findings(rng: np.random.Generator) -> Findings:
    """A case's findings, each present in about a quarter to a third of cases."""
    def side(p: float, both: bool = False) -> str:
        r = rng.random()
        if r >= p:
            return "none"
        if both and r < p / 4:
            return "both"
        return SIDES[int(rng.integers(2))]

    device = ("none", "pacemaker", "line")[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
    return Findings(cardiomegaly=bool(rng.random() < 0.3), effusion=side(0.35, both=True),
                    nodule=side(0.3), consolidation=side(0.3), device=device)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
             ) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def draw_image(f: Findings, rng: np.random.Generator) -> np.ndarray:
    """A 64x64 float32 radiograph in [0, 1] showing `f` (bright: dense, dark: air)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx = SIZE / 2 + rng.normal(0, 1.0)
    img = np.full((SIZE, SIZE), 0.15, np.float32)
    img[_ellipse(yy, xx, 36, cx, 30, 27)] = 0.55  # the body's soft tissue
    lungs = {}
    for s, sign in (("right", -1), ("left", 1)):  # patient right on image left
        lung = _ellipse(yy, xx, 30, cx + sign * 12, 18, 8.5)
        img[lung] = 0.2
        lungs[s] = (lung, cx + sign * 12)
    ctr = rng.uniform(0.52, 0.62) if f.cardiomegaly else rng.uniform(0.36, 0.46)
    half = ctr * 54 / 2  # the thorax is ~54 px wide
    img[_ellipse(yy, xx, 40, cx + 2, 9, half)] = 0.8  # the heart, a little to patient left
    for s in SIDES:
        lung, lx = lungs[s]
        if f.effusion in (s, "both"):  # fluid fills the base, blunting the angle
            img[lung & (yy > 39 + rng.uniform(-1, 1))] = 0.75
        if f.consolidation == s:
            patch = lung & _ellipse(yy, xx, 38, lx, 5, 5) & (rng.random((SIZE, SIZE)) < 0.7)
            img[patch] = 0.7
        if f.nodule == s:
            ny, nx = rng.uniform(20, 30), lx + rng.uniform(-3, 3)
            img[_ellipse(yy, xx, ny, nx, 2.2, 2.2)] = 0.95
    if f.device == "pacemaker":  # a box under the left clavicle, a lead to the heart
        bx = cx + 17
        img[(abs(yy - 12) < 2.5) & (abs(xx - bx) < 3.5)] = 1.0
        t = np.linspace(0, 1, 40)
        img[(12 + t * 26).astype(int), (bx - t * 14).astype(int)] = 1.0
    elif f.device == "line":  # a catheter down the right neck to the heart's top
        t = np.linspace(0, 1, 40)
        img[(2 + t * 28).astype(int), (cx - 6 + 2 * np.sin(3 * t)).astype(int)] = 1.0
    exposure, contrast = rng.uniform(-0.08, 0.08), rng.uniform(0.85, 1.15)
    img = (img - 0.5) * contrast + 0.5 + exposure + rng.normal(0, 0.04, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def make_case(seed: int, index: int) -> tuple[np.ndarray, Findings, str]:
    """Case `index` of the set drawn from `seed`: (image, findings, report)."""
    rng = np.random.default_rng([seed, index])
    findings = draw_findings(rng)
    return draw_image(findings, rng), findings, write_report(findings, rng)
