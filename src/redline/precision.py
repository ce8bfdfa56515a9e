"""Precision policies: how one optimizer step runs in a given number format.

A policy is a small object with a fixed set of methods, chosen by name:

    policy = get_precision("bf16-mixed", device_info)   # refuses what the device cannot run
    model = policy.convert_module(model)                # bf16-true casts the weights
    with policy.global_context():                       # matmul flags, restored on exit
        with policy.forward_context():                  # autocast for forward and loss
            loss = loss_fn(model, batch)
        policy.backward(loss)                           # GradScaler for fp16
        policy.unscale(optimizer)                       # before clipping
        applied = policy.optimizer_step(optimizer)      # False: fp16's scaler skipped it

fp16's `ScalerWatch` tells the scaler's normal start-up skips from a gradient that
overflows at every scale (more than SCALER_SKIP_SHARE of SCALER_WINDOW steps skipped),
which the engine reports and the trainer counts toward train.nonfinite_patience.

A precision the device cannot run raises `PrecisionError` with the reason; it is never
silently replaced by another (peers quietly run fp32 when fp16 was asked for on CPU).

The fp32 baseline pins matmuls to full IEEE fp32: on CPUs with AMX, and on Ampere+ GPUs,
a "high"/"medium" float32 matmul precision silently computes in bf16 or tf32, which would
make a precision study compare bf16 against bf16. `tf32` opts into TF32 on CUDA only.

`fp8` trains chosen Linear layers in float8 through torchao (CUDA sm_89+); `fp8-emulated`
is the same conversion with torchao's emulation on: fp8's numerics on any device, no
speed-up, labelled `emulated` wherever it appears. Which layers convert, and why the others
do not, is fp8.py's plan, kept as the policy's `layer_plan`.

Adding a policy is one class with a `name` and a registry entry in `PRECISIONS`; the
config's `precision.name` is validated against that registry (docs/architecture.md).
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from redline import batch as batch_tree
from redline._torch_compat import supports_found_inf
from redline.device import DeviceInfo, float32_matmul
from redline.errors import UserError, require


class PrecisionError(UserError):
    """The requested precision cannot run on this device; the message says why."""


class Precision:
    """fp32: full IEEE float32 everywhere. Base class of every policy."""

    name: ClassVar[str] = "fp32"
    compute_dtype: ClassVar[torch.dtype] = torch.float32
    param_dtype: ClassVar[torch.dtype] = torch.float32
    matmul_precision: ClassVar[str] = "highest"
    scales_loss: ClassVar[bool] = False  # a loss scaler skips non-finite steps itself

    emulated: ClassVar[bool] = False  # numerics of a format, without its speed

    def __init__(self, device: DeviceInfo, config: PrecisionConfig | None = None) -> None:
        self.device = device
        self.config = config or PrecisionConfig(name=self.name)
        reason = self.unsupported_reason(device)
        if reason:
            raise PrecisionError(f"precision {self.name!r} cannot run on {device.name}: {reason}")

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        """Why this policy cannot run on `device`, or None when it can."""
        return None

    @property
    def compute_dtype_name(self) -> str:
        """The dtype name used for the peak-FLOPs table (tf32 is a mode of float32)."""
        return str(self.compute_dtype).removeprefix("torch.")

    def convert_module(self, model: nn.Module) -> nn.Module:
        return model

    def global_context(self) -> contextlib.AbstractContextManager[None]:
        """Set the global matmul flags this policy needs; restore the previous ones on exit."""
        return float32_matmul(self.matmul_precision)

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale (a no-op without a loss scaler)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """Step the optimizer: True when the update was applied, False when it was
        skipped, None when the optimizer decided on the device (not read: no sync)."""
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @property
    def layer_plan(self) -> list[dict[str, Any]]:
        """Per-layer decisions this policy made in `convert_module` (fp8's); empty otherwise."""
        return []

    def describe(self) -> dict[str, Any]:
        info = {"name": self.name, "compute_dtype": self.compute_dtype_name,
                "param_dtype": str(self.param_dtype).removeprefix("torch.")}
        if self.emulated:
            info["emulated"] = True
        return info


class TF32(Precision):
    """float32 weights and activations, matmuls and convolutions in TF32 (CUDA, sm_80+)."""

    name = "tf32"
    matmul_precision = "high"

    @property
    def compute_dtype_name(self) -> str:
        return "tf32"

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        if not device.is_cuda:
            return ("TF32 is a CUDA tensor-core mode; on CPU, 'high' matmul precision would "
                    "silently compute in bf16 instead. Use fp32 or bf16-mixed")
        if not device.supports_tf32:
            return f"TF32 needs compute capability 8.0 or newer, this GPU has {device.capability}"
        return None


class _Autocast(Precision):
    """Mixed precision: float32 weights, forward under autocast in `compute_dtype`."""

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.kind, dtype=self.compute_dtype)


class BF16Mixed(_Autocast):
    name = "bf16-mixed"
    compute_dtype = torch.bfloat16

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        if not device.supports_bf16:
            return ("bfloat16 needs compute capability 8.0 or newer, "
                    f"this GPU has {device.capability}")
        return None


class FP16Mixed(_Autocast):
    """float16 autocast with a dynamic loss scaler; steps with inf/NaN gradients are skipped."""

    name = "fp16-mixed"
    compute_dtype = torch.float16
    scales_loss = True

    def __init__(self, device: DeviceInfo, config: PrecisionConfig | None = None) -> None:
        super().__init__(device, config)
        self.scaler = torch.amp.GradScaler(device.kind)
        self._hooked: set[int] = set()  # optimizers whose step sets _applied
        self._applied = False

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        if not device.supports_fp16:
            return "this device has no float16 autocast"
        return None

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """scaler.step + update; False when the scaler skipped the step on inf/NaN gradients.

        Whether it skipped is known without another read: a step post-hook on the optimizer
        records that `optimizer.step` ran (GradScaler.step reads its inf flag on the host
        for it). A fused optimizer is handed the flag and skips on the device instead: no
        sync, and None (not known here).
        """
        if supports_found_inf(optimizer):
            self.scaler.step(optimizer)
            self.scaler.update()
            return None
        if id(optimizer) not in self._hooked:
            optimizer.register_step_post_hook(self._mark_applied)
            self._hooked.add(id(optimizer))
        self._applied = False
        self.scaler.step(optimizer)
        self.scaler.update()
        return self._applied

    def _mark_applied(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._applied = True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


SCALER_WINDOW = 20
"""Optimizer steps over which fp16's loss-scaler skips are judged (ScalerWatch)."""
SCALER_SKIP_SHARE = 0.5
"""More than this share of the last SCALER_WINDOW steps skipped is no longer the scaler
calibrating: from 65536 it halves once per overflowing step, so a start-up of a few skips
stays far below it, while a gradient that is non-finite at every scale skips them all."""


class ScalerWatch:
    """Whether fp16's loss scaler skips most updates: a few skips at the start are it
    finding its scale, but more than SCALER_SKIP_SHARE of a full window of SCALER_WINDOW
    steps means the gradients overflow whatever the scale, and fp16 trains nothing.
    `overflowing` holds while that is so; `run` counts the skipped steps in a row."""

    def __init__(self, window: int = SCALER_WINDOW, share: float = SCALER_SKIP_SHARE) -> None:
        self.recent: collections.deque[bool] = collections.deque(maxlen=window)
        self.share = share
        self.run = 0
        self.overflowing = False
        self.warned = False
        self.blind_steps = 0  # steps `observe` could not read for free (a flag on a device)

    def add(self, skipped: bool) -> bool:
        """One optimizer step's outcome; True the first time the share is exceeded (the
        moment to warn)."""
        self.recent.append(skipped)
        self.run = self.run + 1 if skipped else 0
        full = len(self.recent) == self.recent.maxlen
        self.overflowing = full and sum(self.recent) > self.share * len(self.recent)
        first = self.overflowing and not self.warned
        self.warned = self.warned or self.overflowing
        return first

    def observe(self, applied: bool | torch.Tensor | None, norm: torch.Tensor | None,
                step: int) -> dict[str, Any] | None:
        """One step, from what the engine knows on the host for free: the optimizer step's
        own flag (a bool), else a gradient norm in host memory (inf/NaN: skipped); a flag
        or norm on a device is not read (a sync), and the step is not counted. The
        Event.ANOMALY to fire ("scaler_skips") for a skipped step while overflowing."""
        if isinstance(applied, bool):
            skipped = not applied
        elif norm is not None and norm.device.type == "cpu":
            skipped = not math.isfinite(norm.item())
        else:
            self.blind_steps += 1  # the window's count will tell (RunWatch.on_window)
            return None
        self.add(skipped)
        return self._anomaly(step) if self.overflowing and skipped else None

    def add_window(self, steps: int, skipped: int, step: int) -> dict[str, Any] | None:
        """A telemetry window's counts, for steps `observe` could not read: `skipped` of its
        `steps` were skipped by the scaler, in an order the counts do not say, so a run of
        skips continues only through a window skipped whole. The Event.ANOMALY info to act
        on (as `observe`'s) when the share is exceeded, else None."""
        skipped = min(skipped, steps)
        run = self.run + steps if skipped == steps else 0
        for i in range(steps):
            self.add(i < skipped)
        self.run = run
        return self._anomaly(step) if self.overflowing and skipped else None

    def _anomaly(self, step: int) -> dict[str, Any]:
        """The Event.ANOMALY info for a skip at `step` while overflowing."""
        return {"kind": "scaler_skips", "step": step, "run": self.run,
                "skipped": sum(self.recent), "window": len(self.recent),
                "message": self.sentence()}

    def sentence(self) -> str:
        """What happened and what to do, in one sentence."""
        return (f"fp16's loss scaler skipped {sum(self.recent)} of the last {len(self.recent)} "
                "updates on non-finite gradients, so the model is not training: use "
                "bf16-mixed (or fp32), lower the learning rate, or look for an inf in the "
                "loss or the model's outputs")


class BF16True(BF16Mixed):
    """Weights, gradients, optimizer state and activations all in bfloat16 (no fp32 master).

    Floating-point inputs are cast to bfloat16 on their way into the model (a forward
    pre-hook, so the state_dict keys stay those of the user's module).
    """

    name = "bf16-true"
    param_dtype = torch.bfloat16

    def convert_module(self, model: nn.Module) -> nn.Module:
        model = model.to(torch.bfloat16)
        model.register_forward_pre_hook(_cast_inputs_to_bf16, with_kwargs=True)
        return model

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


def _cast_inputs_to_bf16(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                         ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return batch_tree.cast(args, torch.bfloat16), batch_tree.cast(kwargs, torch.bfloat16)


class FP8(Precision):
    """torchao float8 training: chosen Linear layers run their matmuls in fp8 (CUDA sm_89+).

    Every other op, and the layers fp8.plan keeps in high precision, stay in float32; the
    decision for each layer, with its reason, is `layer_plan`.
    """

    name = "fp8"
    def __init__(self, device: DeviceInfo, config: PrecisionConfig | None = None) -> None:
        super().__init__(device, config)
        from redline import fp8

        fp8.torchao_float8()  # a missing torchao is bad input now, not at the first step
        self._plan: list[dict[str, Any]] = []

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        if not device.is_cuda:
            return ("fp8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, "
                    "Hopper); for fp8's numerics without its speed-up use fp8-emulated")
        if not device.supports_fp8:
            return (f"fp8 matmuls need compute capability 8.9 or newer, this GPU has "
                    f"{device.capability}; use fp8-emulated for fp8's numerics")
        return None

    @property
    def compute_dtype_name(self) -> str:
        return "float8"  # no single dense peak: MFU stays empty (telemetry/flops.py)

    def convert_module(self, model: nn.Module) -> nn.Module:
        from redline import fp8

        c = self.config
        decisions = fp8.plan(model, c.fp8_recipe, c.fp8_keep_first_last, c.fp8_min_numel)
        self._plan = [d.to_dict() for d in decisions]
        return fp8.convert(model, decisions, c.fp8_recipe, emulate=self.emulated)

    @property
    def layer_plan(self) -> list[dict[str, Any]]:
        return self._plan

    def describe(self) -> dict[str, Any]:
        converted = sum(d["converted"] for d in self._plan)
        return {**super().describe(), "fp8_recipe": self.config.fp8_recipe,
                "fp8_layers": f"{converted} of {len(self._plan)} converted"}


class FP8Emulated(FP8):
    """fp8's numerics on any device (torchao's emulation): for quality studies. It gives no
    speed-up, and says so wherever it appears."""

    name = "fp8-emulated"
    emulated = True

    @classmethod
    def unsupported_reason(cls, device: DeviceInfo) -> str | None:
        return None


PRECISIONS: dict[str, type[Precision]] = {
    cls.name: cls for cls in (Precision, TF32, FP16Mixed, BF16Mixed, BF16True, FP8,
                              FP8Emulated)
}


def get_precision(name: str, device: DeviceInfo, config: PrecisionConfig | None = None
                  ) -> Precision:
    """The policy called `name` for `device` (fp8 options from `config`); raises
    PrecisionError when it cannot run."""
    try:
        cls = PRECISIONS[name]
    except KeyError:
        raise PrecisionError(
            f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}"
        ) from None
    return cls(device, config)


@dataclass(frozen=True)
class PrecisionConfig:
    """The `precision` section: the number format a run trains in."""

    name: str = "fp32"
    """fp32 | tf32 | fp16-mixed | bf16-mixed | bf16-true | fp8 | fp8-emulated (the policies in
    `PRECISIONS`); one the device cannot run is refused with the reason, never replaced."""
    compile: bool = False
    """torch.compile the model (FLOPs are counted before compiling). On a CPU it cannot be
    combined with memory.budget (the budget's tracker runs every op in Python, where
    nothing is compiled), and the first step of each micro-batch size is then not
    checked against the memory available."""
    channels_last: bool = False
    """Convolution weights in channels-last layout (NHWC): faster convolutions on most
    CPUs and on tensor-core GPUs; no effect on a model without 4-D weights."""
    fp8_recipe: str = "tensorwise"
    """fp8 and fp8-emulated: tensorwise (one scale per tensor) or rowwise (per row)."""
    fp8_keep_first_last: bool = True
    """fp8: keep the first and the last Linear layer in high precision."""
    fp8_min_numel: int = 4096
    """fp8: a Linear with fewer weights than this stays in high precision (a tiny matmul)."""

    def __post_init__(self) -> None:
        require(self.name in PRECISIONS, "precision.name", self.name,
                "one of " + ", ".join(PRECISIONS))
        require(self.fp8_recipe in ("tensorwise", "rowwise"), "precision.fp8_recipe",
                self.fp8_recipe, "tensorwise or rowwise")
        require(self.fp8_min_numel >= 0, "precision.fp8_min_numel", self.fp8_min_numel, ">= 0")
