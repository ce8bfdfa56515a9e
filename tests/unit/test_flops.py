"""FLOPs per step (fake copy first, one real step as fallback), attention kernels and
recomputation, peak FLOP/s, MFU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from redline.device import DeviceInfo, lookup_peak_flops
from redline.telemetry import flops as flops_mod
from redline.telemetry import sdpa_flops
from redline.telemetry.flops import (
    StepFlopCounter,
    analytic_transformer_flops,
    count_step_flops,
    measure_step_flops,
    mfu,
    peak_flops,
)

from ..tasks import gpt_flops

H100 = DeviceInfo(kind="cuda", index=0, name="NVIDIA H100 80GB HBM3", memory_total=80 * 2**30,
                  capability=(9, 0), supports_bf16=True, supports_tf32=True, supports_fp8=True,
                  peak_flops=lookup_peak_flops("NVIDIA H100 80GB HBM3"))
CPU = DeviceInfo(kind="cpu", index=None, name="test cpu", memory_total=2**30)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2),
                         nn.BatchNorm1d(128), nn.Linear(128, 10))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in model.named_parameters()}
    out |= {f"g.{k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    out |= {f"b.{k}": v.clone() for k, v in model.named_buffers()}
    return out


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


BATCH = {"x": torch.randn(8, 64), "y": torch.randint(0, 10, (8,)), "note": "kept as is"}
# Independent count for _mlp at batch 8 (FlopCounterMode: 2 FLOPs per multiply-add; it
# counts matmuls/convs/attention only, not activations, norms or the loss). Forward: two
# addmm. Backward: the weight grads of both layers, the input grad of the second only
# (the batch itself does not require grad).
MLP_FLOPS = 2 * 8 * (64 * 128 + 128 * 10) + 2 * 8 * (64 * 128 + 128 * 10) + 2 * 8 * 128 * 10


def test_linear_matches_flop_counter_conventions() -> None:
    layer = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    fwd = 2 * 8 * 64 * 32  # addmm: one multiply-add per (row, in, out)
    grad_w = 2 * 8 * 64 * 32  # mm(grad_outᵀ, x); the bias grad is a sum, not counted
    assert count_step_flops(layer, x, lambda m, b: m(b).sum()) == fwd + grad_w == 65536
    # With an input that requires grad, backward also computes grad_x: 3x the forward.
    x.requires_grad_(True)
    assert count_step_flops(layer, x, lambda m, b: m(b).sum()) == 3 * fwd


def test_fake_path_counts_without_touching_model_or_rng() -> None:
    model = _mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # existing grads must survive untouched
    before, rng = _state(model), torch.get_rng_state()
    counted = measure_step_flops(model, BATCH, _ce)
    assert counted == (MLP_FLOPS, "fake", MLP_FLOPS)
    _assert_same(before, _state(model))  # incl. BatchNorm running stats and batch count
    assert torch.equal(rng, torch.get_rng_state())


def test_loss_with_randn_without_device_is_counted_and_rng_untouched() -> None:
    model, rng = _mlp(), torch.get_rng_state()
    before = _state(model)

    def noisy(m: nn.Module, batch: Any) -> torch.Tensor:
        return _ce(m, batch) + 1e-3 * torch.randn(3).sum()  # no device=: a CPU tensor

    assert count_step_flops(model, BATCH, noisy) == MLP_FLOPS
    _assert_same(before, _state(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_data_dependent_loss_falls_back_to_one_real_step_on_a_copy() -> None:
    model = _mlp()
    before, rng = _state(model), torch.get_rng_state()

    def data_dependent(m: nn.Module, batch: Any) -> torch.Tensor:
        out = m(batch["x"]) + torch.randn(8, 10)  # consumes the RNG for real
        scale = 2.0 if out.mean().item() > 0 else 1.0  # .item(): fake tensors cannot answer
        return scale * nn.functional.cross_entropy(out, batch["y"])

    assert measure_step_flops(model, BATCH, data_dependent) == (MLP_FLOPS, "real", MLP_FLOPS)
    _assert_same(before, _state(model))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())  # fork_rng restored the stream


def test_uncountable_step_returns_none() -> None:
    def broken(m: nn.Module, batch: Any) -> torch.Tensor:
        raise ValueError("not this batch")

    assert count_step_flops(_mlp(), BATCH, broken) is None
    # Ops the counter does not know (embedding lookups) give 0: reported as unknown.
    emb = nn.Embedding(100, 16)
    assert count_step_flops(emb, torch.tensor([1, 2, 3]), lambda m, b: m(b).sum()) is None


def test_analytic_transformer_formula() -> None:
    assert analytic_transformer_flops(1000, 10) == 60_000  # 6·N·T alone
    # GPT-2 small-ish: N=85M non-embedding, 12 layers, S=1024, d=768, one sequence.
    n, t, layers, s, d = 85_000_000, 1024, 12, 1024, 768
    expected = 6 * n * t + 12 * layers * t * s * d
    assert analytic_transformer_flops(n, t, layers, s, d) == expected
    assert analytic_transformer_flops(n, t, layers, s, d) / (6 * n * t) == pytest.approx(
        1 + 2 * layers * s * d / n)


def test_mfu_arithmetic() -> None:
    assert mfu(4 * 10**12, 0.5, 16e12) == pytest.approx(0.5)
    assert mfu(None, 0.5, 1e12) is None
    assert mfu(10**12, 0.5, None) is None
    assert mfu(10**12, 0.0, 1e12) is None


def test_peak_override_and_table() -> None:
    assert peak_flops(H100, "bfloat16", override=5e14) == (5e14, "override")
    assert peak_flops(H100, "bfloat16") == (989e12, "table")
    assert peak_flops(H100, "tf32") == (494.5e12, "table")
    with pytest.raises(ValueError, match="positive"):
        peak_flops(H100, "bfloat16", override=0.0)


def test_peak_unknown_gpu_and_fp8_are_left_empty() -> None:
    unknown = DeviceInfo(kind="cuda", index=0, name="Some Future GPU", memory_total=None,
                         peak_flops=lookup_peak_flops("Some Future GPU"))
    assert peak_flops(unknown, "bfloat16") == (None, "unknown")
    # The table lists float8 for capability routing, yet MFU for fp8 is never guessed.
    assert H100.peak_for("float8") is not None
    assert peak_flops(H100, "float8") == (None, "unknown")
    assert peak_flops(H100, "float8_e4m3fn") == (None, "unknown")
    assert peak_flops(CPU, "float8") == (None, "unknown")


def test_cpu_peak_is_measured_once_then_read_from_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDLINE_CACHE_DIR", str(tmp_path))
    rng = torch.get_rng_state()
    peak, source = peak_flops(CPU, "float32")  # default cache dir: $REDLINE_CACHE_DIR
    assert source == "measured" and peak is not None and peak > 1e8
    assert torch.equal(rng, torch.get_rng_state())  # random matrices from a private generator
    files = list(tmp_path.glob("cpu-peak-float32-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["threads"] == torch.get_num_threads()

    def no_second_measurement(*args: object, **kwargs: object) -> float:
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(flops_mod, "measure_cpu_matmul_flops", no_second_measurement)
    assert peak_flops(CPU, "float32", cache_dir=tmp_path) == (peak, "measured")


def test_the_cpu_peak_measurement_stops_at_its_budget_on_its_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its budget is kept on the clock it reads (given here, so the load does not matter):
    a matmul that reads as 60 ms stops the sizes growing, and the best-of loop then ends
    at the budget rather than after its eight rounds."""

    class Clock:  # each reading 30 ms after the last: a timed matmul reads as 60 ms
        t = 0.0

        def perf_counter(self) -> float:
            self.t += 0.03
            return self.t

    clock = Clock()
    monkeypatch.setattr(flops_mod, "time", clock)
    sizes: list[int] = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: sizes.append(a.shape[0]) or real_mm(a, b))
    flops = flops_mod.measure_cpu_matmul_flops(CPU, torch.float32, budget_s=0.5)
    assert flops == pytest.approx(2 * 512**3 / 0.03)  # the clock's 30 ms between readings
    assert set(sizes) == {512}  # 60 ms a matmul: no larger size fits the budget
    assert 2 < len(sizes) < 10 and clock.t < 0.5 + 0.1  # ended at the budget, not 8 rounds


def test_cpu_peak_cache_is_keyed_and_survives_corruption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[torch.dtype] = []

    def fake_measure(device: DeviceInfo, dtype: torch.dtype, budget_s: float = 0.5) -> float:
        measured.append(dtype)
        return 1e9 * len(measured)

    monkeypatch.setattr(flops_mod, "measure_cpu_matmul_flops", fake_measure)
    assert peak_flops(CPU, "bfloat16", cache_dir=tmp_path) == (1e9, "measured")
    assert peak_flops(CPU, "bfloat16", cache_dir=tmp_path) == (1e9, "measured")
    assert peak_flops(CPU, "float32", cache_dir=tmp_path) == (2e9, "measured")  # own key
    assert peak_flops(CPU, "tf32", cache_dir=tmp_path) == (2e9, "measured")  # fp32 on CPU
    other = DeviceInfo(kind="cpu", index=None, name="another cpu", memory_total=None)
    assert peak_flops(other, "float32", cache_dir=tmp_path) == (3e9, "measured")
    for path in tmp_path.glob("cpu-peak-bfloat16-*.json"):
        path.write_text("{not json")
    assert peak_flops(CPU, "bfloat16", cache_dir=tmp_path) == (4e9, "measured")
    assert measured == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]


# ---- MFU by its definition (issue 19, observed case 5) -------------------------------------
GPT_BATCH = 2  # sequences of gpt_flops.SEQ tokens


def _gpt_ids() -> torch.Tensor:
    return torch.randint(0, gpt_flops.VOCAB, (GPT_BATCH, gpt_flops.SEQ + 1),
                         generator=torch.Generator().manual_seed(0))


def _gpt_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return gpt_flops.GptFlops.loss(None, model, [ids])  # type: ignore[arg-type]


def _gpt_analytic(model: nn.Module) -> int:
    tokens = GPT_BATCH * gpt_flops.SEQ
    return analytic_transformer_flops(gpt_flops.matmul_weights(model), tokens,
                                      gpt_flops.LAYERS, gpt_flops.SEQ, gpt_flops.WIDTH)


def test_a_small_gpt_counts_6NT_plus_attention_on_cpu() -> None:
    """The count equals 6·N·tokens + 12·L·tokens·S·d exactly: CPU flash attention (which
    torch's counter has no formula for) is counted, fake and real path alike."""
    model = gpt_flops.TinyGPT()
    expected = _gpt_analytic(model)
    assert count_step_flops(model, _gpt_ids(), _gpt_loss) == expected
    with StepFlopCounter() as counter:  # one real step: the kernels that really ran
        _gpt_loss(model, _gpt_ids()).backward()
    ops = {str(op) for op in counter._mode.get_flop_counts()["Global"]}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert counter.model_flops == expected
    # The fused backward recomputes QKᵀ (b·h·S·S·d_head multiply-adds per layer): hardware.
    tokens = GPT_BATCH * gpt_flops.SEQ
    qk = 2 * tokens * gpt_flops.SEQ * gpt_flops.WIDTH
    assert counter.hardware_flops == expected + gpt_flops.LAYERS * qk


def test_checkpointing_does_not_change_flops_per_step_and_hfu_counts_the_reruns() -> None:
    plain = measure_step_flops(gpt_flops.TinyGPT(), _gpt_ids(), _gpt_loss)
    checkpointed = measure_step_flops(gpt_flops.TinyGPT(checkpointing=True), _gpt_ids(),
                                      _gpt_loss)
    assert plain is not None and checkpointed is not None
    assert checkpointed.total == plain.total == _gpt_analytic(gpt_flops.TinyGPT())
    # Hardware FLOPs add each block's forward as far as backward reruns it: attention's
    # forward (4·S·d per token) and the Linears but the last (8·d² of the 12·d² weights):
    # non-reentrant checkpoint stops once the tensors backward needs are back, and no
    # backward needs the output of `down`. What ran is counted, not a rule of thumb.
    tokens, d, s = GPT_BATCH * gpt_flops.SEQ, gpt_flops.WIDTH, gpt_flops.SEQ
    rerun = gpt_flops.LAYERS * (2 * 8 * d * d * tokens + 4 * tokens * s * d)
    assert checkpointed.hardware == plain.hardware + rerun
    assert mfu(checkpointed.hardware, 1.0, 1e9) > mfu(checkpointed.total, 1.0, 1e9)  # type: ignore[operator]


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_and_non_reentrant_checkpoints_are_left_out_alike(reentrant: bool) -> None:
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=reentrant)

    batch = {"x": BATCH["x"].clone().requires_grad_(reentrant), "y": BATCH["y"]}
    plain = measure_step_flops(_mlp(), batch, _ce)
    counted = measure_step_flops(Checkpointed(), batch, _ce)
    assert plain is not None and counted is not None
    assert counted.total == plain.total
    # Reentrant reruns the whole forward; non-reentrant stops once the tensors backward
    # needs are back: the last Linear's output is not one of them.
    rerun = 2 * 8 * (64 * 128 + (128 * 10 if reentrant else 0))
    assert counted.hardware == plain.hardware + rerun


def test_a_loss_that_differentiates_itself_is_not_taken_for_recomputation() -> None:
    """A gradient penalty runs a backward with gradients on (create_graph=True): model
    FLOPs, not a rerun."""
    layer = nn.Linear(64, 32)

    def penalised(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # not a leaf: FlopCounterMode's module tracker cannot follow autograd.grad to one
        h = x.detach().requires_grad_(True) * 2
        out = m(h).pow(2).sum()
        (grad,) = torch.autograd.grad(out, h, create_graph=True)
        return out + grad.pow(2).sum()

    counted = measure_step_flops(layer, torch.randn(8, 64), penalised)
    assert counted is not None and counted.total == counted.hardware > 3 * 2 * 8 * 64 * 32


def test_attention_formulas_are_scoped_and_torch_s_own_formula_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    before = dict(flop_counter.flop_registry)
    q = torch.randn(1, 2, 8, 4)
    with StepFlopCounter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.hardware_flops == 4 * 2 * 8 * 8 * 4  # 4·b·h·s_q·s_k·d, torch's formula
    assert flop_counter.flop_registry == before  # nothing registered globally
    with FlopCounterMode(display=False) as plain:  # so torch's own counter is unchanged
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0
    # A torch that adds its own formula for the kernel: its formula is the one used.
    monkeypatch.setitem(flop_counter.flop_registry, cpu_flash,
                        lambda *args, out_val=None, **kwargs: 7)
    with StepFlopCounter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.hardware_flops == 7
    assert cpu_flash not in sdpa_flops.attention_formulas()


def test_model_flops_do_not_depend_on_the_attention_kernel() -> None:
    """The math kernel keeps the S×S matrix (plain bmm, nothing recomputed); CPU flash
    attention recomputes QKᵀ in its backward: the same model FLOPs either way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = measure_step_flops(gpt_flops.TinyGPT(), _gpt_ids(), _gpt_loss)
    with sdpa_kernel(SDPBackend.MATH):
        math = measure_step_flops(gpt_flops.TinyGPT(), _gpt_ids(), _gpt_loss)
    assert fused is not None and math is not None
    assert math.total == math.hardware == fused.total < fused.hardware


# Inference-only fused layers (nn.MultiheadAttention's fast path, which also runs the
# projections): never taken in a training step, whose modules are in training mode.
_NOT_IN_TRAINING = {"_native_multi_head_attention"}
# Not counted, and said so in telemetry/flops.py's docstring: packed variable-length and
# nested-tensor attention (torch.nn.attention.varlen: its FLOPs depend on cum_seq's
# lengths), and the experimental Triton kernels nothing in torch dispatches to.
_NOT_COUNTED = {"_cudnn_attention_forward", "_cudnn_attention_backward",
                "_triton_multi_head_attention", "_triton_scaled_dot_attention"}


def _composite(name: str) -> bool:
    op = getattr(torch.ops.aten, name).default if hasattr(
        getattr(torch.ops.aten, name), "default") else None
    return op is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), "CompositeImplicitAutograd")


def test_every_attention_kernel_this_torch_has_is_counted() -> None:
    """A torch that adds an attention kernel fails here until it is counted: torch's
    registry (the CUDA flash, efficient and cudnn kernels) or telemetry/sdpa_flops.py."""
    ours = sdpa_flops.attention_formulas()
    # Every aten op registered (dir(torch.ops.aten) lists only those looked up so far);
    # composite ones decompose into kernels before the counter sees them.
    every = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::")}
    names = sorted(n for n in every if "attention" in n and n not in _NOT_IN_TRAINING | _NOT_COUNTED
                   and not _composite(n))
    assert "_scaled_dot_product_flash_attention_for_cpu" in names
    missing = [n for n in names if getattr(torch.ops.aten, n) not in flop_counter.flop_registry
               and getattr(torch.ops.aten, n) not in ours]
    assert not missing
    for kernel in ("flash", "efficient", "cudnn"):  # what a CUDA device runs, torch counts
        op = getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention_backward")
        assert op in flop_counter.flop_registry and op in sdpa_flops.recomputing_backwards()


def test_added_formulas_are_torch_s_own() -> None:
    b, h, s_q, s_k, d = 2, 3, 5, 7, 4
    q, k, v = torch.randn(b, h, s_q, d), torch.randn(b, h, s_k, d), torch.randn(b, h, s_k, d)
    forward = 4 * b * h * s_q * s_k * d
    backward = 2 * b * h * s_q * s_k * (3 * d + 2 * d)
    aten = torch.ops.aten
    for op, formula in sdpa_flops.attention_formulas().items():
        if op is aten._flash_attention_forward_no_dropout_inplace:
            continue  # takes (batch, seq, heads, dim) tensors: CUDA's flash layout
        backward_op = str(op).endswith("_backward")
        args = (q, q, k, v) if backward_op else (q, k, v)
        assert formula(*args) == (backward if backward_op else forward), op
        if backward_op:
            assert sdpa_flops.recomputed_share((1, 3), args) == (d, 5 * d)
