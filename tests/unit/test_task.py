from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import torch

import redline.plugins as plugins_mod
import redline.task as task_mod
from redline.task import TaskError, available_tasks, resolve_task

from ..conftest import TOY


def test_builtin_names_are_listed_in_the_error() -> None:
    with pytest.raises(TaskError) as e:
        resolve_task("sr4-tiny")
    msg = str(e.value)
    assert "sr4-tiny" in msg and "sr3-tiny" in msg and "file.py:Class" in msg


def test_file_spec_loads_a_protocol_only_task() -> None:
    t = resolve_task(TOY, {"n": 64})
    assert t.name == "toy" and len(t.train_data()) == 64
    # optional methods that the file lacks get the protocol's defaults
    assert not hasattr(type(t), "series") and t.series(t.build_model(), None) == {}


def test_module_spec_and_task_args_errors() -> None:
    t = resolve_task("tests.tasks.toy:ToyRegression")
    assert t.name == "toy"
    with pytest.raises(TaskError, match="does not accept task_args"):
        resolve_task(TOY, {"width": 3})


def test_errors_raised_by_the_tasks_own_code_are_not_bad_input() -> None:
    """The constructor's own ValueError is the task's code speaking: it keeps its type
    and traceback, it is not reported as 'rejected its task_args'."""
    with pytest.raises(ValueError, match="n must be >= 1") as info:
        resolve_task(TOY, {"n": 0})
    assert not isinstance(info.value, TaskError)
    assert info.traceback[-1].path.name == "toy.py"


def test_an_import_failing_inside_the_users_module_keeps_its_traceback(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    (tmp_path / "needs_pkg.py").write_text("import not_installed_anywhere\n\nclass T: ...\n")
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "tasks.py").write_text("import also_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_anywhere") as info:
        resolve_task(f"{tmp_path / 'needs_pkg.py'}:T")
    assert not isinstance(info.value, TaskError)
    with pytest.raises(ModuleNotFoundError, match="also_not_installed") as info:
        resolve_task("userpkg.tasks:T")
    assert not isinstance(info.value, TaskError)
    with pytest.raises(TaskError, match=r"cannot import module 'userpkg\.nothing'"):
        resolve_task("userpkg.nothing:T")  # the spec itself names nothing: bad input


@pytest.mark.slow
def test_a_file_tasks_classes_reach_spawned_dataloader_workers(tmp_path: Path) -> None:
    """A Dataset class defined in the task file is pickled into workers started with
    spawn (macOS's default, Linux's from Python 3.14) and forkserver: they must be able
    to import the file's module by its name."""
    (tmp_path / "spawn_task.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset\n\n"
        "class Squares(Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return torch.tensor([float(i * i)])\n\n"
        "class SpawnTask:\n"
        "    name = 'spawn'\n"
        "    def build_model(self): return torch.nn.Linear(1, 1)\n"
        "    def train_data(self): return Squares()\n"
        "    def loss(self, model, batch): return model(batch).mean()\n")
    task = resolve_task(f"{tmp_path / 'spawn_task.py'}:SpawnTask")
    for method in ("spawn", "forkserver"):
        loader = torch.utils.data.DataLoader(task.train_data(), batch_size=4, num_workers=1,
                                             multiprocessing_context=method)
        assert [b.flatten().tolist() for b in loader] == [[0, 1, 4, 9], [16, 25, 36, 49]]


def test_a_task_file_may_not_hide_another_module(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("class T: ...\n")
    with pytest.raises(TaskError, match="rename"):
        resolve_task(f"{tmp_path / 'json.py'}:T")


@pytest.mark.parametrize(("spec", "words"), [
    ("missing_file.py:T", "does not exist"),
    ("no_such_pkg.mod:T", "cannot import module"),
    (f"{TOY.split(':')[0]}:Nope", "has no attribute 'Nope'"),
    ("collections:OrderedDict", "missing required method"),
])
def test_bad_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(TaskError, match=words):
        resolve_task(spec)


def test_entry_point_group_registers_tasks(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    ep = EntryPoint(name="toy-ep", value="tests.tasks.toy:ToyRegression",
                    group=task_mod.ENTRY_POINT_GROUP)

    def fake_entry_points(group: str) -> list[EntryPoint]:
        return [ep] if group == task_mod.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(plugins_mod, "entry_points", fake_entry_points)
    assert available_tasks()["toy-ep"] == "tests.tasks.toy:ToyRegression"
    assert resolve_task("toy-ep", {"n": 32}).name == "toy"


def test_every_member_redline_reads_is_declared_on_the_protocol() -> None:
    declared = set(task_mod.Task.__annotations__) | {
        n for n in vars(task_mod.Task) if not n.startswith("_")}
    assert set(task_mod.MEMBERS) <= declared
    for member in task_mod.MEMBERS:
        if member in vars(task_mod.Task):  # methods carry their docstring
            assert getattr(task_mod.Task, member).__doc__, member
    # TaskBase supplies every optional member, so a subclass reads as "not declared"
    for member in task_mod.OPTIONAL_MEMBERS:
        assert hasattr(task_mod.TaskBase, member), member


def test_task_member_reads_an_optional_member_or_none() -> None:
    class Bare:
        def flops_per_sample(self) -> float:
            return 3.0

    assert task_mod.task_member(Bare(), "flops_per_sample")() == 3.0
    assert task_mod.task_member(Bare(), "metric_directions") is None
    assert task_mod.task_member(task_mod.TaskBase(), "flops_per_sample") is None
    with pytest.raises(AssertionError):
        task_mod.task_member(Bare(), "flops_per_sampel")  # redline reads no other name


def test_a_misspelled_member_is_named_once_with_what_it_resembles(
        capsys: pytest.CaptureFixture[str]) -> None:
    class Misspelt(task_mod.TaskBase):
        metric_direction = ("psnr", "max")
        sample_steps = 50  # a task's own setting, not close enough to `samples`

        def flops_per_sampel(self) -> float:
            return 1.0

    said = task_mod.check_members(Misspelt())
    err = capsys.readouterr().err
    assert len(said) == 2 and err.count("\n") == 2
    assert "'flops_per_sampel'" in err and "did you mean 'flops_per_sample'" in err
    assert "'metric_direction'" in err and "did you mean 'metric_directions'" in err
    assert task_mod.check_members(Misspelt()) == []  # once per class and name
    assert capsys.readouterr().err == ""


def test_resolve_task_warns_about_a_misspelled_member(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "typo_task.py").write_text(
        "from tests.tasks.toy import ToyRegression\n"
        "class Typo(ToyRegression):\n"
        "    def evalute(self, model, loader):\n"
        "        return {}\n")
    resolve_task(f"{tmp_path / 'typo_task.py'}:Typo")
    err = capsys.readouterr().err
    assert "'evalute'" in err and "did you mean 'evaluate'" in err


def test_a_datasets_collate_fn_batches_every_loader_and_the_probe_batch() -> None:
    from redline.batch import first_samples
    from redline.data import eval_loader, train_loader

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            return i

        @staticmethod
        def collate_fn(items: list[int]) -> dict[str, list[int]]:
            return {"ids": list(items)}

    data = Pairs()
    assert first_samples(data, 2) == {"ids": [0, 1]}
    assert next(iter(eval_loader(data, 2, {}))) == {"ids": [0, 1]}
    assert set(next(iter(train_loader(data, 2, seed=0, options={})))) == {"ids"}


def test_a_task_object_handed_in_is_checked_like_a_resolved_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.tasks.toy import ToyRegression

    class Handed(ToyRegression):
        def seriess(self, model: object, batch: object) -> dict:
            return {}

    task = task_mod.check_task(Handed(n=8))
    assert task.series(task.build_model(), None) == {}  # the default, as resolve_task's
    assert "did you mean 'series'" in capsys.readouterr().err

    class NoLoss:
        def build_model(self) -> None: ...

        def train_data(self) -> None: ...

    with pytest.raises(TaskError, match="loss"):
        task_mod.check_task(NoLoss())


# ---- the Task hooks real models need (issue 19, observed case 6) ----------------------------

def test_near_misses_of_the_new_hooks_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    class NearMiss(task_mod.TaskBase):
        def schedular(self, optimizer: object) -> None: ...

        def collate(self, samples: list) -> list:
            return samples

    said = task_mod.check_members(NearMiss())
    assert len(said) == 2
    err = capsys.readouterr().err
    assert "'schedular'" in err and "did you mean 'scheduler'" in err
    assert "'collate'" in err and "did you mean 'collate_fn'" in err


class _Hooked:
    """Odd-length samples batched by the task's hooks: a probe of which collation ran."""

    name = "hooked"

    def __init__(self, eval_sets: object = "one") -> None:
        self.eval_sets = eval_sets

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    def train_data(self) -> torch.utils.data.Dataset:
        return _Lengths()

    def eval_data(self) -> object:
        return {"a": _Lengths(), "b": _Lengths()} if self.eval_sets == "two" else _Lengths()

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, _ = batch
        return model(x.float().mean(1, keepdim=True)).pow(2).mean()

    def collate_fn(self, samples: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
        return torch.nn.utils.rnn.pad_sequence(samples, batch_first=True), "train"

    def eval_collate_fn(self, samples: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
        return torch.nn.utils.rnn.pad_sequence(samples, batch_first=True), "eval"


class _Lengths(torch.utils.data.Dataset):
    collate_fn = None  # a dataset attribute the task's hook takes precedence over

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.ones(1 + i % 3)


def _job(task: object, **values: object) -> Any:
    from redline.config import RunConfig
    from redline.device import DeviceInfo
    from redline.job.build import build_job

    config = RunConfig(task="hooked").updated({"train.batch_size": 4, "train.steps": 6,
                                               **values})
    return build_job(config, task_mod.check_task(task), DeviceInfo.detect("cpu"))


def test_the_tasks_collate_hooks_batch_every_loader_the_job_builds() -> None:
    from redline.batch import first_samples
    from redline.data import iterate_from

    job = _job(_Hooked())
    assert next(iterate_from(job.train_loader(), 0, 0))[1] == "train"
    assert first_samples(job.train_set, 3)[0].shape == (3, 3)  # padded to the longest
    assert list(job.eval_sets) == [""] and job.eval_set is job.eval_sets[""]
    assert next(iter(job.eval_loader("", 4)))[1] == "eval"
    assert len(job.train_set) == 8 and job.train_set.__getitem__(2).shape == (3,)


def test_named_evaluation_sets_are_evaluated_each_under_its_name() -> None:
    from redline.run.evaluation import evaluate_sets

    job = _job(_Hooked(eval_sets="two"))
    assert list(job.eval_sets) == ["a", "b"]
    assert sorted(evaluate_sets(job, 4, 1, seed=0)) == ["a/loss", "b/loss"]
    lone = _job(_Hooked())
    assert list(evaluate_sets(lone, 4, 1, seed=0)) == ["loss"]


def test_a_bad_evaluation_dict_is_named() -> None:
    class Bad(_Hooked):
        def eval_data(self) -> object:
            return {"": _Lengths()}

    with pytest.raises(TaskError, match="non-empty set names"):
        _job(Bad())


def test_the_tasks_scheduler_replaces_the_configs_and_says_so() -> None:
    class OneParam(_Hooked):
        def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=0.1)

        def scheduler(self, optimizer: torch.optim.Optimizer) -> object:
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    job = _job(OneParam(), **{"train.batch_size": 2, "train.effective_batch_size": 4})
    assert isinstance(job.scheduler, torch.optim.lr_scheduler.StepLR)
    assert job.notes[0] == "task optimizer SGD sets lr 0.1; train.lr 0.0002 is not used"
    assert job.notes[1].startswith("task scheduler StepLR sets the lr")
    lrs = []
    for _ in range(4):  # accumulation 2: stepped once per optimizer step
        job.engine.step(job.task.collate_fn([torch.ones(2)] * 4), job.task.loss)
        lrs.append(job.lr)
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])

    class TwoParams(_Hooked):
        def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> object:
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=total_steps)

    cycle = _job(TwoParams())
    assert cycle.scheduler.total_steps == 6  # train.steps
    for _ in range(9):  # a timing past the run's length stops at the schedule's end
        cycle.engine.step(cycle.task.collate_fn([torch.ones(2)] * 4), cycle.task.loss)
    assert cycle.scheduler.last_epoch == 6

    class Plain(_Hooked):
        pass

    assert _job(Plain()).notes == []  # redline's AdamW at train.lr: nothing replaced


def test_a_scheduler_that_needs_a_metric_is_refused() -> None:
    class Plateau(_Hooked):
        def scheduler(self, optimizer: torch.optim.Optimizer) -> object:
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)

    with pytest.raises(TaskError, match="ReduceLROnPlateau"):
        _job(Plateau())


def test_the_schedule_advances_on_a_skipped_step_as_torchs_loop_does() -> None:
    class Nan(_Hooked):
        def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
            return super().loss(model, batch) * float("nan")

        def scheduler(self, optimizer: torch.optim.Optimizer) -> object:
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    job = _job(Nan(), **{"train.on_nonfinite": "skip"})
    before = [p.clone() for p in job.model.parameters()]
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch's own warning
        job.engine.step(job.task.collate_fn([torch.ones(2)] * 4), job.task.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, job.model.parameters(), strict=True))
    assert job.scheduler.last_epoch == 1 and job.lr == pytest.approx(1e-4)


def test_the_task_hooks_example_in_the_training_guide_runs_as_written(tmp_path: Path) -> None:
    import re

    from redline.config import RunConfig
    from redline.device import DeviceInfo
    from redline.job.build import build_job
    from redline.job.runner import JobRunner
    from redline.run.evaluation import evaluate_sets

    guide = (Path(__file__).resolve().parents[2] / "docs" / "train.md").read_text()
    (source,) = [b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S)
                 if b.startswith("# tagger_task.py")]
    (tmp_path / "tagger_task.py").write_text(source)
    task = resolve_task(f"{tmp_path / 'tagger_task.py'}:TaggerTask")
    config = RunConfig(task="tagger").updated({"train.batch_size": 8, "train.steps": 4})
    job = build_job(config, task, DeviceInfo.detect("cpu"))
    assert type(job.scheduler).__name__ == "OneCycleLR" and job.notes
    runner = JobRunner(job)
    losses = [float(runner.next_step()) for _ in range(4)]
    assert all(0 < v < 10 for v in losses)
    assert sorted(evaluate_sets(job, 8, 1, seed=0)) == [
        "long/accuracy", "long/loss", "short/accuracy", "short/loss"]
