"""What redline relies on in torch's private APIs (redline/_torch_compat.py), checked on
the installed torch: an upgrade that changes one fails here, not silently in a run."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from redline import _torch_compat as compat

from ..ddpcount import counted_ddp

SCRIPTS = Path(__file__).resolve().parents[1] / "distributed"


def test_pytree_flattens_with_is_leaf_and_rebuilds_a_registered_dataclass() -> None:
    @dataclasses.dataclass
    class Pair:
        x: torch.Tensor
        names: list[str]

    torch.utils._pytree.register_dataclass(Pair)  # what batch.py tells users to call
    batch = {"a": Pair(torch.ones(2), ["p", "q"]), "b": (torch.zeros(2), 3)}
    leaves, spec = compat.tree_flatten(batch, is_leaf=lambda v: isinstance(v, list))
    assert [type(v) for v in leaves] == [torch.Tensor, list, torch.Tensor, int]
    rebuilt = compat.tree_unflatten([v * 2 if isinstance(v, torch.Tensor) else v
                                     for v in leaves], spec)
    assert isinstance(rebuilt["a"], Pair) and rebuilt["a"].names == ["p", "q"]
    assert torch.equal(rebuilt["a"].x, torch.full((2,), 2.0)) and rebuilt["b"][1] == 3
    assert compat.tree_leaves((torch.ones(1), [torch.zeros(1)])) [1].item() == 0.0


def test_the_pytree_logger_is_the_one_its_module_logs_to() -> None:
    assert logging.getLogger(compat.PYTREE_LOGGER) is logging.getLogger(
        torch.utils._pytree.__name__)
    assert compat.PYTREE_LOGGER == "torch.utils._pytree"


def test_a_dispatch_mode_sees_each_aten_op_and_runs_it() -> None:
    seen: list[str] = []

    class Spy(compat.TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            seen.append(compat.op_name_and_return_aliases(func)[0])
            return func(*args, **(kwargs or {}))

    a = torch.ones(3)
    with Spy():
        out = (a + 1).view(3, 1)
    assert seen == ["aten::add", "aten::view"] and out.shape == (3, 1)


@pytest.mark.parametrize("op, name, aliases", [
    (torch.ops.aten.add.Tensor, "aten::add", [None]),        # fresh memory
    (torch.ops.aten.view.default, "aten::view", [False]),    # read-only view
    (torch.ops.aten.add_.Tensor, "aten::add_", [True]),      # written in place
    (torch.ops.aten._unsafe_view.default, "aten::_unsafe_view", [None]),  # unannotated
])
def test_an_op_schema_names_the_op_and_how_its_returns_alias(op: Any, name: str,
                                                           aliases: list[bool | None]) -> None:
    assert compat.op_name_and_return_aliases(op) == (name, aliases)


def test_a_fake_tensor_mode_turns_real_tensors_fake_and_counts_no_storage() -> None:
    mode = compat.fake_tensor_mode()
    real = torch.randn(4, 8)
    fake = mode.from_tensor(real)
    with mode:
        out = fake @ torch.randn(8, 2)  # a plain tensor is made fake on first use
    assert out.shape == (4, 2) and type(out) is type(fake) and type(fake) is not torch.Tensor


def test_foreach_copy_and_norm() -> None:
    dst, src = [torch.zeros(2), torch.zeros(3)], [torch.ones(2), torch.arange(3.0)]
    compat.foreach_copy_(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    norms = compat.foreach_norm([torch.tensor([3.0, 4.0]), torch.zeros(2)])
    assert [n.item() for n in norms] == [5.0, 0.0]


def test_which_layers_use_batch_statistics_and_which_hold_running_stats() -> None:
    batch_stats = [nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2),
                   nn.SyncBatchNorm(2), nn.LazyBatchNorm1d()]
    assert all(compat.uses_batch_statistics(m) and compat.has_running_stats(m)
               for m in batch_stats)
    instance = nn.InstanceNorm2d(2, track_running_stats=True)
    assert compat.has_running_stats(instance) and not compat.uses_batch_statistics(instance)
    assert not any(compat.has_running_stats(m) or compat.uses_batch_statistics(m)
                   for m in (nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.Linear(2, 2)))


@pytest.mark.slow  # torch.compile's first use imports dynamo: seconds
def test_unwrap_compiled_finds_the_module_torch_compile_wrapped() -> None:
    model = nn.Linear(2, 2)
    assert compat.unwrap_compiled(torch.compile(model)) is model  # wrapping compiles nothing
    assert compat.unwrap_compiled(model) is model


def _steps_with_flag(flag: float) -> tuple[bool, float]:
    """Whether a fused AdamW's parameters moved, and its step count, with `found_inf`."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = model.weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    with compat.found_inf_given(opt, torch.tensor(flag)):
        opt.step()
    assert not hasattr(opt, "found_inf")  # removed again: a later plain step is unaffected
    return not torch.equal(before, model.weight), float(opt.state[model.weight]["step"])


def test_a_fused_optimizer_given_found_inf_skips_the_update_and_its_step_count() -> None:
    assert _steps_with_flag(0.0) == (True, 1.0)
    assert _steps_with_flag(1.0) == (False, 0.0)


def test_only_optimizers_that_honour_found_inf_say_so() -> None:
    params = list(nn.Linear(2, 2).parameters())
    assert compat.supports_found_inf(torch.optim.AdamW(params, fused=True))
    assert compat.supports_found_inf(torch.optim.SGD(params, lr=0.1, fused=True))
    assert not compat.supports_found_inf(torch.optim.AdamW(params, foreach=True))
    assert not compat.supports_found_inf(torch.optim.SGD(params, lr=0.1))


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group: DDP's reducer and the default store, in this process."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_default_store_is_the_groups_key_value_store(one_rank_group: None) -> None:
    store = compat.default_store()
    store.set("redline/test", "1")
    assert store.get("redline/test") == b"1" and store.check(["redline/test"])
    assert store.add("redline/n", 2) == 2


def test_no_default_store_without_a_group() -> None:
    assert not dist.is_initialized() and compat.default_store() is None


def test_an_armed_backward_after_a_no_sync_forward_all_reduces_once(one_rank_group: None
                                                                    ) -> None:
    torch.manual_seed(0)
    ddp, calls = counted_ddp(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    x = torch.randn(6, 4)
    for _ in range(2):  # a step like the engine's: two micro-batches, then a second step
        with ddp.no_sync():
            ddp(x[:3]).sum().backward()
            last = ddp(x[3:]).sum()
        assert calls == []  # nothing all-reduced under no_sync
        compat.arm_all_reduce(ddp)
        last.backward()
        assert calls == [0]  # one bucket, all-reduced once
        calls.clear()
        ddp.zero_grad()
    with ddp.no_sync():  # the control: unarmed, a no_sync forward's backward stays local
        unarmed = ddp(x).sum()
    unarmed.backward()
    assert calls == []


@pytest.mark.slow  # torch.compile's first use imports dynamo: seconds
def test_arming_reaches_ddp_through_torch_compile(one_rank_group: None) -> None:
    ddp, calls = counted_ddp(nn.Linear(4, 1))
    compiled = torch.compile(ddp)
    with ddp.no_sync():
        loss = ddp(torch.randn(2, 4)).sum()
    compat.arm_all_reduce(compiled)
    loss.backward()
    assert calls == [0]


@pytest.mark.slow  # two processes under torchrun: seconds
def test_two_ranks_armed_backward_all_reduces_once_to_the_average(tmp_path: Path) -> None:
    out = tmp_path / "armed.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(SCRIPTS / "armed_all_reduce.py"),
                          str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["unarmed_calls"] == [0, 0]  # neither rank all-reduced without arming
    assert result["armed_calls"] == [1, 1]  # each rank all-reduced its one bucket once
    assert result["max_diff_from_average"] < 1e-6
    assert result["ranks_differed"] > 1e-3  # the average is not what either rank had


class _Seen(compat.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_compiled_code_runs_eagerly_under_a_dispatch_mode_and_compiles_later() -> None:
    compiles = []

    def backend(gm: Any, example: Any) -> Any:
        compiles.append(gm)
        return gm.forward

    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    step = torch.compile(twice, fullgraph=True, backend=backend)
    x = torch.ones(3)
    mode = _Seen()
    with compat.compiled_runs_eagerly(), mode:  # as the memory tracker enters them
        assert torch.equal(step(x), twice(x))
    assert mode.ops >= 2 and not compiles  # eager: every op seen, nothing compiled
    assert torch.equal(step(x), twice(x))
    assert len(compiles) == 1  # the frame was not skipped for good: it compiles now
    # what the eager stance avoids
    with pytest.raises(Exception, match="fullgraph"), _Seen():
        torch.compile(lambda x: x - 1, fullgraph=True, backend=backend)(x)


def test_plain_tensors_opens_a_wrapper_subclass_to_the_tensors_holding_its_bytes() -> None:
    subclass_8bit = pytest.importorskip("torchao.optim.subclass_8bit")
    state = subclass_8bit.OptimState8bit.zeros((4096,), signed=True, block_size=256)
    inner = list(compat.plain_tensors(state))
    assert [t.dtype for t in inner] == [torch.uint8, torch.float32, torch.float32]
    assert sum(t.untyped_storage().nbytes() for t in inner) == 4096 + 16 * 4 + 256 * 4
    plain = torch.ones(2)
    assert list(compat.plain_tensors(plain)) == [plain]


def test_view_version_is_none_for_a_fresh_tensor_and_bumped_by_an_in_place_change() -> None:
    linear = torch.nn.Linear(4, 4)
    out = linear(torch.randn(2, 3, 4))  # a 3-D input: Linear returns a view of its mm
    fresh = torch.randn(2, 4) + 1
    assert compat.view_version(fresh) is None
    before = compat.view_version(out)
    assert before is not None
    out += 1
    assert compat.view_version(out) == before + 1


def test_dcp_metadata_reads_weights_only_and_another_global_is_refused(tmp_path: Path
                                                                        ) -> None:
    import io
    import os
    import pickle

    import torch.distributed.checkpoint as dcp

    from redline._torch_compat import dcp_metadata_globals, weights_only_unpickle

    dcp.save({"w": torch.ones(2, 3), "lr": 0.1}, checkpoint_id=tmp_path, no_dist=True)
    metadata = pickle.loads((tmp_path / ".metadata").read_bytes())  # torch's own, trusted
    again = io.BytesIO(pickle.dumps(metadata, protocol=2))  # the protocol redline writes
    assert weights_only_unpickle(again, dcp_metadata_globals()) == metadata
    evil = io.BytesIO(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        weights_only_unpickle(evil, dcp_metadata_globals())


def test_an_fsdp_reset_drops_what_an_aborted_no_sync_backward_accumulated(
        one_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    fully_shard(net[0])
    fully_shard(net)
    x = torch.randn(3, 4)
    compat.reset_fsdp_step(net)  # before any forward: nothing to reset, no error
    net.set_requires_gradient_sync(False)  # type: ignore[operator]
    net(x * 5).sum().backward()  # an aborted attempt's micro-batch: kept unsharded
    compat.reset_fsdp_step(net)
    net.set_requires_gradient_sync(True)  # type: ignore[operator]
    net(x).sum().backward()
    got = [p.grad.full_tensor().clone() for p in net.parameters()]
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    plain(x).sum().backward()
    assert all(torch.allclose(g, p.grad) for g, p in zip(got, plain.parameters(), strict=True))
