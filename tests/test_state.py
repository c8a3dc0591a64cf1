"""TrainState: entries, replace, load, clone."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_states_equal, make_state

import functrain as ft
from functrain.models import MLP
from functrain.state import ENTRIES


def test_entries_and_static_part():
    state = make_state()
    assert list(state.tensors().keys()) == list(ENTRIES)
    assert state.static.model is not None
    # the skeleton holds no memory: its own tensors live on the meta device
    assert all(p.is_meta for p in state.static.model.parameters())
    assert all(p.requires_grad for p in state.params.values(True, True))


def test_load_copies_into_a_fresh_state():
    a = make_state()
    x = torch.randn(16, 16)
    a = ft.step(a, (x, torch.zeros(16, dtype=torch.long)))
    saved = a.clone().tensors()
    b = make_state().load(saved)
    assert_states_equal(b.tensors(), a.tensors())
    b.params["0", "weight"].data.add_(1)  # the loaded state owns its tensors
    assert_states_equal(a.tensors(), saved)


def test_load_names_mismatched_entries():
    other = make_state(optimizer=ft.sgd(lr=0.1, momentum=0.9)).tensors()
    with pytest.raises(
        ValueError, match=r"does not fit.*missing opt/mu/0/bias.*unexpected opt/momentum/0/bias"
    ):
        make_state().load(other)


def test_load_lists_a_few_mismatches_of_each_kind():
    wide = make_state(MLP(in_features=16, hidden=64, classes=4, depth=2)).tensors()
    with pytest.raises(ValueError) as err:
        make_state().load(wide)
    message = str(err.value)
    assert "buffers/1/running_mean is torch.float32 [64], expected torch.float32 [32]" in message
    assert message.count(" is torch.float32 ") == 3 and message.endswith("more like it")


def test_unknown_attribute_lists_entries():
    with pytest.raises(AttributeError, match="entries are"):
        make_state().nonsense  # noqa: B018


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_bind_goes_up_as_itself_and_the_model_is_left_as_it_was(interrupt):
    state = make_state()
    with pytest.raises(interrupt), state.bind():  # a second Ctrl-C mid-forward: exit 130
        raise interrupt()
    assert all(p.is_meta for p in state.static.model.parameters())
    with state.bind() as model:  # and it binds again
        assert not next(model.parameters()).is_meta
