"""Tune's schedulers, made to read a score as what it is: an FID with its noise and its card.

A trial's result carries eval/fid, eval/fid_std (its bootstrap std) and card_key (the key of
its provenance card, pipeline.quality.evaluator). Two scores compare only on equal cards, and
only by more than their noise (`margin` standard deviations of the difference, the rule BEST
follows in pipeline.checkpoint):

- ASHA stops a trial at a rung only if its FID trails the rung's cutoff by more than its own
  noise; the rung records the plain FID, so other trials' cutoffs are not shifted.
- PBT exploits (copies a better trial's checkpoint into a worse one) only when every trial of
  the upper quantile beats the worse one by more than the noise of the two.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining, TrialScheduler

from pipeline import storage
from pipeline import tensorboard as tb

log = logging.getLogger(__name__)

METRIC, METRIC_STD = tb.TAG_EVAL_FID, tb.TAG_EVAL_FID_STD
TIME_ATTR = "step"
CARD_KEY = "card_key"


class _CardCheck:
    """Keeps the first card key a sweep scores on; a result on another is not compared."""

    def __init__(self) -> None:
        self.card_key: Optional[str] = None

    def comparable(self, trial, result: dict[str, Any]) -> bool:
        if METRIC not in result:
            return False
        key = result.get(CARD_KEY)
        if self.card_key is None:
            self.card_key = key
        if key != self.card_key:
            log.warning("trial %s scored on provenance card %s, the sweep on %s: its score is not compared",
                        trial, key, self.card_key)  # fmt: skip
            return False
        return True


def noise(result: dict[str, Any]) -> float:
    std = result.get(METRIC_STD)
    return float(std) if isinstance(std, (int, float)) and math.isfinite(std) else 0.0


class NoiseAwareASHA(AsyncHyperBandScheduler):
    """One bracket of asynchronous successive halving. Its rungs are kept in `state` (a file
    of the sweep's directory) after every score: Tune restores trials, not its scheduler, and a
    resumed sweep must judge the trials left against the scores of those that finished."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float = 2, margin: float = 1.0,
                 state: Optional[str] = None):  # fmt: skip
        super().__init__(time_attr=TIME_ATTR, metric=METRIC, mode="min", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=1)  # fmt: skip
        self.margin = margin
        self._cards = _CardCheck()
        self._state = state  # the rungs' file: a path or URI
        # Read at the first trial, not here: a resumed Tuner unpickles this scheduler as it was
        # built, before any score.
        self._loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._loaded:
            self._loaded = True
            self._load()

    def _load(self) -> None:
        if self._state is None:
            return
        directory, _, name = self._state.rpartition("/")
        try:
            saved = json.loads(storage.location(directory).read_text(name))
        except FileNotFoundError:
            return
        rungs = dict(self._brackets[0]._rungs)
        for milestone, recorded in saved["rungs"]:
            rungs[milestone].update(recorded)
        self._cards.card_key = saved.get("card_key")
        log.info("ASHA's rungs restored from %s: %s", name, {m: len(r) for m, r in saved["rungs"]})

    def _save(self) -> None:
        if self._state is not None:
            directory, _, name = self._state.rpartition("/")
            state = {"rungs": self._brackets[0]._rungs, "card_key": self._cards.card_key}
            storage.location(directory).write_text(name, json.dumps(state))

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if TIME_ATTR not in result or not self._cards.comparable(trial, result):
            return TrialScheduler.CONTINUE
        fid = float(result[METRIC])
        if not math.isfinite(fid):
            return TrialScheduler.STOP  # a diverged trial has nothing to catch up with
        action = self._judge(trial, int(result[TIME_ATTR]), fid, self.margin * noise(result))
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
            log.info("ASHA stops %s at step %s: FID %.4g ± %.2g trails the rung", trial, result[TIME_ATTR], fid, noise(result))
        return action

    def _judge(self, trial, step: int, fid: float, tolerance: float) -> str:
        """ASHA's rung rule (ray.tune.schedulers.async_hyperband._Bracket.on_result): at the
        first rung this step reaches that has no score of the trial yet, stop it if it trails
        the rung's cutoff; the comparison allows `tolerance`, the record keeps the FID."""
        bracket = self._trial_info[trial.trial_id]
        for milestone, recorded in bracket._rungs:  # highest rung first
            if step < milestone or trial.trial_id in recorded:
                continue
            cutoff = bracket.cutoff(recorded)  # rewards: -FID, higher is better
            recorded[trial.trial_id] = -fid
            self._save()
            return TrialScheduler.STOP if cutoff is not None and -(fid - tolerance) < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE


class NoiseAwarePBT(PopulationBasedTraining):
    def __init__(self, perturbation_interval: int, hyperparam_mutations: dict[str, Any], margin: float = 1.0, seed: int = 0):
        import random

        random.seed(seed)  # PBT's exploit and perturbation draw from Python's random
        super().__init__(time_attr=TIME_ATTR, metric=METRIC, mode="min", perturbation_interval=perturbation_interval,
                         hyperparam_mutations=hyperparam_mutations, quantile_fraction=0.25, require_attrs=False)  # fmt: skip
        self.margin = margin
        self._cards = _CardCheck()
        self._noise: dict[Any, float] = {}

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if not self._cards.comparable(trial, result):
            return TrialScheduler.CONTINUE
        self._noise[trial] = noise(result)
        return super().on_trial_result(tune_controller, trial, result)

    def _quantiles(self):
        lower, upper = super()._quantiles()
        if not upper:
            return lower, upper

        def clearly_worse(trial) -> bool:
            score = self._trial_state[trial].last_score  # -FID: higher is better
            return all(
                self._trial_state[u].last_score - score > self.margin * math.hypot(self._noise.get(trial, 0.0), self._noise.get(u, 0.0))
                for u in upper
            )

        kept = [trial for trial in lower if clearly_worse(trial)]
        for trial in set(lower) - set(kept):
            log.info("PBT leaves %s alone: its FID is within the noise of the upper quantile's", trial)
        return kept, upper
