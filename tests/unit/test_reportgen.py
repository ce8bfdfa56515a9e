"""reportgen-tiny: deterministic generated cases, a grammar that round-trips, the field's
metrics as pycocoevalcap computes them, and the model's decoders."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from redline.examples import cxr

pytest.importorskip("pycocoevalcap")


def test_cases_are_the_same_on_every_draw_and_differ_between_cases() -> None:
    a, b = cxr.make_case(0, 7), cxr.make_case(0, 7)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    other = cxr.make_case(0, 8)
    assert not np.array_equal(a[0], other[0])
    assert a[0].shape == (64, 64) and a[0].min() >= 0.0 and a[0].max() <= 1.0


def test_every_finding_in_every_phrasing_reads_back_exactly() -> None:
    rng = np.random.default_rng(0)
    cases = [cxr.Findings(c, e, n, k, d) for c, e, n, k, d in itertools.product(
        (False, True), ("none", "left", "right", "both"), ("none", "left", "right"),
        ("none", "left", "right"), ("none", "pacemaker", "line"))]
    for findings in cases:
        for _ in range(6):  # several phrasings and orders of each
            report = cxr.write_report(findings, rng)
            assert cxr.read_findings(report) == findings, report


def test_the_findings_show_in_the_image() -> None:
    rng = np.random.default_rng(1)
    normal = cxr.draw_image(cxr.Findings(), rng)
    rng = np.random.default_rng(1)
    effusion = cxr.draw_image(cxr.Findings(effusion="right"), rng)
    assert effusion[40:50, :32].mean() > normal[40:50, :32].mean() + 0.05  # patient right


@pytest.mark.slow
def test_the_metrics_are_pycocoevalcap_s_on_the_same_pairs() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from redline.examples.captioning import caption_scores, tokenized

    rng = np.random.default_rng(2)
    refs = [cxr.make_case(3, i)[2] for i in range(12)]
    hyps = [cxr.write_report(cxr.draw_findings(rng), rng) for _ in range(12)]
    ours = caption_scores(refs, hyps)
    r = tokenized({i: [t] for i, t in enumerate(refs)})
    h = tokenized({i: [t] for i, t in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(r, h, verbose=0)
    assert [ours[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(r, h)[0])
    assert ours["cider"] == pytest.approx(Cider().compute_score(r, h)[0])
    if "meteor" in ours:  # Java present
        from pycocoevalcap.meteor.meteor import Meteor

        assert ours["meteor"] == pytest.approx(Meteor().compute_score(r, h)[0], abs=1e-4)
    same = caption_scores(refs, refs)
    assert same["bleu4"] == pytest.approx(1.0) and same["bleu4"] > ours["bleu4"]
    # each sample's own BLEU-4, shown beside it in the report: pycocoevalcap's per-sentence
    from redline.examples.captioning import sentence_bleu4

    per = Bleu(4).compute_score(r, h, verbose=0)[1][3]
    assert sentence_bleu4(refs, hyps) == pytest.approx(per)
    assert sentence_bleu4(refs[:2], refs[:2]) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_clinical_efficacy_counts_labels_micro_averaged() -> None:
    from redline.examples.captioning import clinical_efficacy

    truth = [(1, 0, 1), (0, 1, 0)]
    said = [(1, 1, 0), (0, 1, 0)]  # 2 right of 3 said; 2 found of 3 there
    ce = clinical_efficacy(truth, said)
    assert ce["ce_precision"] == pytest.approx(2 / 3) and ce["ce_recall"] == pytest.approx(2 / 3)
    assert ce["ce_f1"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_greedy_and_beam_decoding_end_at_eos_and_beam_scores_at_least_greedy() -> None:
    from redline.examples.r2gen import EOS, PAD, R2GenTiny

    torch.manual_seed(0)
    model = R2GenTiny(40, d=32, max_len=12).eval()
    images = torch.rand(3, 1, 64, 64)
    for beam in (1, 3):
        ids = model.generate(images, beam=beam)
        assert ids.shape[0] == 3 and ids.shape[1] <= 11
        for row in ids.tolist():  # after an EOS only PAD
            if EOS in row:
                assert set(row[row.index(EOS) + 1:]) <= {PAD}
