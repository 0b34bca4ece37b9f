"""Optuna's private API, in one module, behind named functions.

The study code needs what Optuna's public API does not give: a sampler's random generators (to reseed
them per trial), the storage of a study (to write a study attribute or add a trial without a ``Study``
method that would load every trial, to claim a WAITING trial atomically, to beat and sweep), and the
storage id of a trial. Optuna keeps these as ``TPESampler._rng`` and ``_random_sampler._rng``,
``Study._storage``, ``Study._study_id`` and ``Trial._trial_id`` / ``FrozenTrial._trial_id`` (read in
Optuna 4.x). When a release renames them, this module is the one place to change;
tests/test_architecture.py fails on a private attribute of another library's object anywhere else.
"""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState


def reseed_tpe_sampler(sampler: optuna.samplers.TPESampler, seed: int) -> None:
    """Reseed a TPE sampler's generators (its own and its start-up random sampler's): Optuna keeps them
    private, and reseeding them is the one way to make a trial's sample depend on its index alone."""
    sampler._rng.rng.seed(seed)
    sampler._random_sampler._rng.rng.seed(seed)


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage the study reads and writes (its public methods are Optuna's storage API)."""
    return study._storage


def study_id_of(study: optuna.Study) -> int:
    """The study's id in its storage."""
    return study._study_id


def trial_id_of(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number)."""
    return trial._trial_id


def set_study_attr(study: optuna.Study, key: str, value: object) -> None:
    """Write one study user attribute straight to the storage."""
    storage_of(study).set_study_user_attr(study_id_of(study), key, value)


def add_trial(study: optuna.Study, template: FrozenTrial) -> int:
    """Add a trial made from ``template`` (e.g. WAITING, with params) to the study; returns its number."""
    storage = storage_of(study)
    return storage.get_trial_number_from_id(storage.create_new_trial(study_id_of(study), template_trial=template))


def trials_in(study: optuna.Study, state: TrialState) -> list[FrozenTrial]:
    """The study's trials in ``state``, read from the storage without copying them."""
    return storage_of(study).get_all_trials(study_id_of(study), deepcopy=False, states=(state,))
