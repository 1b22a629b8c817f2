"""LP-FT's first step: the head set to a linear probe before fine-tuning.

Kumar et al. (2022), "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution" (ICLR): while a random head is being fitted, fine-tuning changes the
features in the directions the training images span and leaves the others, so features of
images unlike the training ones fall out of step with the head. Fitting the head first (a
logistic regression on the pretrained penultimate features, "linear probing") and fine-tuning
from there distorts them less; they report higher out-of-distribution accuracy at equal
in-distribution accuracy. That presumes pretrained features that transfer: on PBC -> JTSC,
where fine-tuning with stain views helps because it changes the features, the probe lowers
zero-shot accuracy (README, "Three more fine-tuning levers").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .model import FinetuneModel

#: The probe's inverse L2 strength on standardised features (scikit-learn's default); fixed,
#: so nothing is chosen on the data it is fitted to.
PROBE_C = 1.0
PROBE_MAX_ITER = 2000


def probe_head(
    model: FinetuneModel,
    features: np.ndarray,
    labels: Sequence[int],
    *,
    class_weighted: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Set ``model.head`` to a multinomial logistic regression fitted on ``features`` (the
    pretrained network's penultimate features of the training samples, (N, D)).

    The regression is fitted on standardised features and its weights are mapped back, so the
    head reads the raw features as before. A class missing from ``labels`` keeps its row of
    the seeded head. Returns what the probe did (for the run's record).
    """
    y = np.asarray(labels, dtype=int)
    scaler = StandardScaler().fit(features)
    probe = LogisticRegression(
        C=PROBE_C,
        max_iter=PROBE_MAX_ITER,
        class_weight="balanced" if class_weighted else None,
        random_state=seed,
    ).fit(scaler.transform(features), y)
    coef, intercept = probe.coef_, probe.intercept_
    if len(probe.classes_) == 2:  # one row w for two classes: logits (-w/2, w/2) give its odds
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scaler.scale_  # w'x + b' equals w((x - mean)/scale) + b
    bias = intercept - weight @ scaler.mean_
    head = model.head
    with torch.no_grad():
        rows = torch.as_tensor(probe.classes_, dtype=torch.long)
        head.weight[rows] = torch.as_tensor(weight, dtype=head.weight.dtype)
        head.bias[rows] = torch.as_tensor(bias, dtype=head.bias.dtype)
    return {
        "head_init": "probe",
        "probe_c": PROBE_C,
        "probe_iterations": int(np.max(probe.n_iter_)),
        "probe_train_accuracy": float(probe.score(scaler.transform(features), y)),
    }
