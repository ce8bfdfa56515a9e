"""The settings doctor's advice names, by who owns the training loop and its loader.

A run of `redline train` is changed through redline's config keys; a framework run
(Lightning, the Hugging Face Trainer: config.yaml's `framework`) only through the
framework's own settings, and a loop of one's own (`Telemetry` from your code: no
config.yaml, or one without redline's `data` section) through its own DataLoader and
objects. A rule asks for a setting by what it does (`WORKERS`, `BF16`, ...), and gets the
words for this run; redline-only mechanisms (the batch search, memory.target, the OOM
guard) have no entry for the others, so a rule that needs one stays silent for them.
"""

from __future__ import annotations

from typing import Any

REDLINE, OWN = "redline", "own"

WORKERS = "workers"  # more loader processes
PIN = "pin"  # page-locked host memory for copies to the GPU
PERSIST = "persist"  # keep the loader's processes across epochs
BF16 = "bf16"  # train in bf16-mixed
FP32 = "fp32"  # train in fp32
COMPILE = "compile"  # compile the model
FEWER_MICRO = "fewer-micro"  # the same effective batch in fewer, larger micro-batches
LR = "lr"  # the learning rate
LOG_EVERY = "log-every"  # telemetry's window length
RESUME = "resume"  # how to go on after the run ended early

SETTINGS: dict[str, dict[str, str]] = {
    REDLINE: {
        WORKERS: "data.num_workers", PIN: "set data.pin_memory: true",
        PERSIST: "set data.persistent_workers: true",
        BF16: "precision.name: bf16-mixed", FP32: "precision.name: fp32",
        COMPILE: "set precision.compile: true",
        FEWER_MICRO: "set train.batch_size: auto, which runs the effective batch in the "
                     "fewest micro-batches that fit memory.target",
        LR: "train.lr", LOG_EVERY: "telemetry.log_every",
    },
    "lightning": {
        WORKERS: "DataLoader(num_workers=...)", PIN: "pass DataLoader(pin_memory=True)",
        PERSIST: "pass DataLoader(persistent_workers=True)",
        BF16: 'Trainer(precision="bf16-mixed")', FP32: 'Trainer(precision="32-true")',
        COMPILE: "compile the model (torch.compile) before Trainer.fit",
        FEWER_MICRO: "raise the DataLoader's batch_size and lower Trainer("
                     "accumulate_grad_batches=...) to match, which keeps the effective batch",
        LR: "the optimizer's learning rate (configure_optimizers)",
        LOG_EVERY: "RedlineCallback(log_every=...)",
        RESUME: "Trainer.fit(..., ckpt_path=...) from your last checkpoint",
    },
    "transformers": {
        WORKERS: "TrainingArguments(dataloader_num_workers=...)",
        PIN: "pass TrainingArguments(dataloader_pin_memory=True)",
        PERSIST: "pass TrainingArguments(dataloader_persistent_workers=True)",
        BF16: "TrainingArguments(bf16=True)", FP32: "TrainingArguments(fp16=False, bf16=False)",
        COMPILE: "pass TrainingArguments(torch_compile=True)",
        FEWER_MICRO: "raise TrainingArguments(per_device_train_batch_size=...) and lower "
                     "gradient_accumulation_steps to match, which keeps the effective batch",
        LR: "TrainingArguments(learning_rate=...)",
        LOG_EVERY: "RedlineCallback(log_every=...)",
        RESUME: "Trainer.train(resume_from_checkpoint=True)",
    },
    OWN: {
        WORKERS: "your DataLoader's num_workers", PIN: "pass DataLoader(pin_memory=True)",
        PERSIST: "pass DataLoader(persistent_workers=True)",
        BF16: 'precision "bf16-mixed" (Engine(model, optimizer, "bf16-mixed"))',
        FP32: 'precision "fp32"', COMPILE: "compile the model (torch.compile)",
        FEWER_MICRO: "run the batch in fewer, larger micro-batches "
                     "(Engine(micro_batch_size=...))",
        LR: "the optimizer's learning rate", LOG_EVERY: "TelemetryConfig(log_every=...)",
        RESUME: "your loop's last checkpoint",
    },
}


def owner(cfg: dict[str, Any]) -> str:
    """Who owns the run's loop and loader: a framework's name, REDLINE (config.yaml holds
    redline's resolved `data` section), or OWN (a loop of one's own, or no config)."""
    framework = cfg.get("framework")
    if isinstance(framework, dict):
        framework = framework.get("name")
    if isinstance(framework, str) and framework:
        return framework if framework in SETTINGS else OWN
    return REDLINE if isinstance(cfg.get("data"), dict) else OWN


def framework_accumulation(cfg: dict[str, Any]) -> int | None:
    """The framework's gradient accumulation, as its callback recorded it (`framework:
    {accumulate}`, or where earlier callbacks kept the framework's own setting); None:
    unknown."""
    framework = cfg.get("framework")
    trainer, args = cfg.get("trainer"), cfg.get("training_args")
    for value in (framework.get("accumulate") if isinstance(framework, dict) else None,
                  trainer.get("accumulate_grad_batches") if isinstance(trainer, dict) else None,
                  args.get("gradient_accumulation_steps") if isinstance(args, dict) else None):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
