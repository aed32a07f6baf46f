"""clm: next-token prediction, the language-model loss (the default objective)."""

from __future__ import annotations

from gorilla_dist.objectives.base import Objective


class CLM(Objective):
    name = "clm"
    token_loss = True

    def units(self, batch, rows):
        return (batch.loss_mask * rows[:, None]).sum()  # (a boolean index would read the device)

    def sums(self, model, batch, rows, losses, group):
        mask = batch.loss_mask * rows[:, None].float()
        return (losses * mask).sum(), losses.new_zeros(())
