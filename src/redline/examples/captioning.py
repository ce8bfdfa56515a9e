"""The report-generation field's text metrics, as it computes them: pycocoevalcap.

    scores = caption_scores(references, hypotheses)
    # {"bleu1".."bleu4", "meteor", "rouge_l", "cider"}: corpus-level, as R2Gen reports them

pycocoevalcap's PTB tokenizer and its METEOR run in Java (the JVM starts once, ~13 s,
and one METEOR process is kept for the whole run). Without Java the texts are tokenized
by a plain rule (lower case, words and full stops apart) and METEOR is left out, which is
said once on stderr. SPICE needs a download and is not computed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any

from redline.errors import MissingExtra


@functools.cache
def java() -> bool:
    """Whether pycocoevalcap's Java parts (PTB tokenizer, METEOR) can run here."""
    if shutil.which("java") is None:
        print("redline: no Java found: METEOR is unavailable (pycocoevalcap runs it in Java); "
              "BLEU, ROUGE-L and CIDEr use a plain tokenizer", file=sys.stderr, flush=True)
        return False
    return True


def _scorers() -> dict[str, Any]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise MissingExtra("report-generation metrics", "pycocoevalcap", "examples") from None
    return {"bleu": Bleu(4), "rouge_l": Rouge(), "cider": Cider()}


@functools.cache
def _meteor() -> Any:
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()  # starts the JVM once for the process


def tokenized(texts: dict[int, list[str]]) -> dict[int, list[str]]:
    """The texts as pycocoevalcap scores them: its PTB tokenizer where Java runs."""
    if java():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _java_quiet():
            return PTBTokenizer().tokenize({i: [{"caption": t} for t in ts]
                                            for i, ts in texts.items()})
    return {i: [" ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())) for t in ts]
            for i, ts in texts.items()}


@contextlib.contextmanager
def _java_quiet() -> Iterator[None]:
    """The PTB tokenizer's JVM prints a line per call on stderr (the process's file
    descriptor, which it inherits): send it to /dev/null for the call."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def caption_scores(references: list[str], hypotheses: list[str], *, bleu_only: bool = False
                   ) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR (where Java runs), ROUGE-L and CIDEr of `hypotheses`
    against one reference each (`bleu_only`: BLEU-1..4 alone)."""
    assert len(references) == len(hypotheses), "one reference per hypothesis"
    scorers = _scorers()
    refs = tokenized({i: [r] for i, r in enumerate(references)})
    hyps = tokenized({i: [h] for i, h in enumerate(hypotheses)})
    hyps = {i: [h[0] or "."] for i, h in hyps.items()}  # an empty hypothesis scores 0
    bleu, _ = scorers["bleu"].compute_score(refs, hyps, verbose=0)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    if bleu_only:
        return scores
    if java():
        scores["meteor"] = float(_meteor().compute_score(refs, hyps)[0])
    scores["rouge_l"] = float(scorers["rouge_l"].compute_score(refs, hyps)[0])
    scores["cider"] = float(scorers["cider"].compute_score(refs, hyps)[0])
    return scores


def sentence_bleu4(references: list[str], hypotheses: list[str]) -> list[float]:
    """Each hypothesis's own BLEU-4 against its reference (pycocoevalcap's per-sentence
    scores, as shown beside a sample)."""
    refs = tokenized({i: [r] for i, r in enumerate(references)})
    hyps = tokenized({i: [h] for i, h in enumerate(hypotheses)})
    hyps = {i: [h[0] or "."] for i, h in hyps.items()}
    _, per = _scorers()["bleu"].compute_score(refs, hyps, verbose=0)
    return [float(b) for b in per[3]]


def clinical_efficacy(truth: list[tuple[int, ...]], predicted: list[tuple[int, ...]]
                      ) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 of predicted findings labels against the
    true ones (R2Gen's clinical efficacy; here the labels are read back exactly)."""
    tp = sum(t & p for ts, ps in zip(truth, predicted, strict=True)
             for t, p in zip(ts, ps, strict=True))
    positives = sum(map(sum, predicted))
    actual = sum(map(sum, truth))
    precision = tp / positives if positives else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"ce_precision": precision, "ce_recall": recall, "ce_f1": f1}
