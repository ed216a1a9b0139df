"""The per-sample loss contract on its own: what ``training_step`` must return, and the errors that
say so."""

import pytest
import torch

from lit_efficient.data.sample_losses import CONTRACT, check_contract


def test_the_per_sample_losses_are_returned_as_given():
    losses = torch.rand(4)
    assert check_contract({"loss": losses.mean(), "sample_losses": losses}, "InfoBatch") is losses


@pytest.mark.parametrize("output, detail", [
    (torch.tensor(1.0), "It returned a Tensor"),
    ({"loss": torch.tensor(1.0)}, "a dict with keys ['loss']"),
    ({"loss": torch.tensor(1.0), "sample_losses": torch.rand(2, 3)}, "`sample_losses` was (2, 3)"),
    ({"loss": torch.tensor(1.0), "sample_losses": torch.zeros(0)}, "`sample_losses` was (0,)"),
    ({"loss": torch.tensor(1.0), "sample_losses": [0.1, 0.2]}, "`sample_losses` was list"),
])
def test_a_module_outside_the_contract_is_told_the_contract(output, detail):
    with pytest.raises(ValueError) as err:
        check_contract(output, "LossReweighting")
    assert str(err.value).startswith("LossReweighting need per-sample losses")
    assert CONTRACT in str(err.value) and detail in str(err.value)
