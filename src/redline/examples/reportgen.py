"""`reportgen-tiny`: R2Gen-style findings reports from chest radiographs, on generated data.

**The data are procedural, not real radiographs** (no radiograph/report pairs can be
downloaded here, and none ships in a package): examples/cxr.py draws each case's findings
(cardiomegaly, effusions, a nodule, consolidation, a support device), a 64x64 image that
shows them, and a report in IU X-Ray's style with varied phrasing. The draw is seeded, so
the data are the same on every machine. The run says so on stderr.

The model is a tiny R2Gen (examples/r2gen.py): a CNN visual extractor's patch features, a
transformer encoder, and a decoder whose layer norms are conditioned on a relational
memory. Training is teacher forcing, with the loss the mean over reports of each report's
per-token cross-entropy. Evaluation decodes by beam search (beam 3, as R2Gen) and reports
what the field reports: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap
(examples/captioning.py), and clinical efficacy, the precision, recall and F1 of the
findings read back from the generated text against the case's true findings (exact here:
the grammar is closed). Beside them, the trivial baseline: every case given the training
set's most common report (`baseline_bleu4`, `baseline_ce_f1`), and greedy decoding's
BLEU-4 (`greedy_bleu4`).
"""

from __future__ import annotations

import functools
import sys
from collections import Counter

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from redline._torch_compat import unwrap_compiled
from redline.examples import cxr
from redline.examples.captioning import caption_scores, clinical_efficacy, sentence_bleu4
from redline.examples.r2gen import BOS, EOS, PAD, R2GenTiny
from redline.task import Sample, TaskBase, TaskError

MAX_LEN = 64  # tokens with BOS and EOS; the longest report is ~50


@functools.cache
def _cases(seed: int, n: int) -> tuple[np.ndarray, list[str], list[cxr.Findings]]:
    cases = [cxr.make_case(seed, i) for i in range(n)]
    return (np.stack([c[0] for c in cases])[:, None], [c[2] for c in cases],
            [c[1] for c in cases])


class ReportGenTask(TaskBase):
    """Generate a chest radiograph's findings report (module docstring)."""

    name = "reportgen-tiny"

    def __init__(self, train_cases: int = 2000, eval_cases: int = 200, seed: int = 0,
                 width: int = 64, beam: int = 3) -> None:
        for key, value, ok in (("train_cases", train_cases, train_cases >= 16),
                               ("eval_cases", eval_cases, eval_cases >= 1),
                               ("width", width, width >= 16 and width % 4 == 0),
                               ("beam", beam, 1 <= beam <= 8)):
            if isinstance(value, bool) or not isinstance(value, int) or not ok:
                raise TaskError(f"reportgen-tiny: task_args.{key}={value!r} is out of range "
                                "(train_cases >= 16, width a multiple of 4 >= 16, beam 1-8)")
        print("redline: reportgen-tiny's radiographs and reports are generated "
              "(examples/cxr.py), not real patient data", file=sys.stderr, flush=True)
        self.words = ["<pad>", "<bos>", "<eos>", *cxr.vocabulary()]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.width, self.beam = width, beam
        # train and eval are drawn from different seeds: no case is in both
        images, reports, _ = _cases(seed, train_cases)
        self._train = TensorDataset(torch.from_numpy(images), self.encode(reports))
        self.most_common = Counter(reports).most_common(1)[0][0]
        images, reports, findings = _cases(seed + 10_000, eval_cases)
        self._eval = TensorDataset(torch.from_numpy(images), self.encode(reports))
        self.eval_findings = findings
        self._baselines: dict[int, dict[str, float]] = {}  # per number of cases evaluated

    # ---- text <-> tokens --------------------------------------------------------------------

    def encode(self, reports: list[str]) -> torch.Tensor:
        ids = torch.full((len(reports), MAX_LEN), PAD, dtype=torch.long)
        for row, report in enumerate(reports):
            tokens = [BOS, *(self.index[w] for w in cxr.tokenize(report)), EOS]
            ids[row, :len(tokens)] = torch.tensor(tokens[:MAX_LEN])
        return ids

    def decode(self, ids: torch.Tensor) -> str:
        words = []
        for i in ids.tolist():
            if i in (EOS, PAD):
                break
            if i != BOS:
                words.append(self.words[i])
        return " ".join(words).replace(" .", ".")

    # ---- the Task ---------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return R2GenTiny(len(self.words), d=self.width, max_len=MAX_LEN)

    def train_data(self) -> Dataset:
        return self._train

    def eval_data(self) -> Dataset:
        return self._eval

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, tokens = batch
        logits = model(images, tokens[:, :-1]).float()
        target = tokens[:, 1:]
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                                ignore_index=PAD, reduction="none")
        real = (target != PAD).float()
        return ((per_token * real).sum(1) / real.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def generate(self, model: nn.Module, images: torch.Tensor, beam: int | None = None
                 ) -> list[str]:
        core = unwrap_compiled(model)  # torch.compile's wrapper
        core = getattr(core, "module", core)  # DistributedDataParallel's
        device = next(core.parameters()).device
        ids = core.generate(images.to(device), beam=beam or self.beam)
        return [self.decode(row) for row in ids.cpu()]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Beam-search reports against the references: the field's metrics, clinical
        efficacy, greedy BLEU-4, and the most-common-report baseline."""
        hyps, greedy, refs = [], [], []
        for images, tokens in loader:
            hyps += self.generate(model, images)
            greedy += self.generate(model, images, beam=1)
            refs += [self.decode(row) for row in tokens]
        if not refs:
            return {}
        truth = [f.labels() for f in self.eval_findings[:len(refs)]]
        metrics = caption_scores(refs, hyps)
        metrics.update(clinical_efficacy(truth, [cxr.read_findings(h).labels() for h in hyps]))
        metrics["greedy_bleu4"] = caption_scores(refs, greedy, bleu_only=True)["bleu4"]
        return {**metrics, **self._baseline(refs, truth)}

    def _baseline(self, refs: list[str], truth: list[tuple[int, ...]]) -> dict[str, float]:
        """The most common training report given to every case: the same at every
        evaluation of the same cases, so scored once."""
        n = len(refs)
        if n not in self._baselines:
            said = [cxr.read_findings(self.most_common).labels()] * n
            self._baselines[n] = {
                "baseline_bleu4": caption_scores(refs, [self.most_common] * n,
                                                 bleu_only=True)["bleu4"],
                "baseline_ce_f1": clinical_efficacy(truth, said)["ce_f1"]}
        return self._baselines[n]

    @torch.no_grad()
    def samples(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> list[Sample]:
        """Each radiograph with its reference and generated report, the generated report's
        BLEU-4 and its findings F1 against the reference's."""
        images, tokens = batch
        texts = self.generate(model, images)
        references = [self.decode(ids) for ids in tokens]
        bleu = sentence_bleu4(references, texts)
        out = []
        for image, reference, text, b4 in zip(images, references, texts, bleu, strict=True):
            truth, said = (cxr.read_findings(reference).labels(),
                           cxr.read_findings(text).labels())
            # a normal case reported normal is right, though no finding was there to find
            f1 = 1.0 if not any(truth) and not any(said) else clinical_efficacy(
                [truth], [said])["ce_f1"]
            out.append(Sample(title="generated radiograph (not patient data)",
                              images={"radiograph": image[0].numpy()},
                              texts={"reference": reference, "generated": text},
                              metrics={"bleu4": b4, "ce_f1": f1}))
        return out
