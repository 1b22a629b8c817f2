"""Saliency: the torch SVM decision equals scikit-learn's, and maps fall on the class evidence."""

import numpy as np
import pytest
import torch
from torch import nn

from leukotype.classify import decision_scores, make_svm_pipeline
from leukotype.saliency import TorchSVMDecision


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_torch_svm_decision_equals_the_pipelines_decision_scores(kernel, n_classes):
    rng = np.random.default_rng(n_classes)
    X = rng.normal(size=(80, 6)) * rng.uniform(0.01, 5, 6) + rng.normal(size=6)
    y = np.array(list("ABCD"))[rng.integers(0, n_classes, 80)]
    X[:, 0] += (y == "A") * 2.0
    classes = sorted(set(y))[::-1]  # a column order that is not the SVC's own
    pipeline = make_svm_pipeline(kernel=kernel, C=1.0).fit(X, y)
    module = TorchSVMDecision(nn.Identity(), pipeline, classes)
    X_new = rng.normal(size=(7, 6))
    expected = decision_scores(pipeline, X_new, classes)
    got = module.decision(torch.from_numpy(X_new)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # Exact autograd gradient of the predicted class's score, checked by central differences.
    x = torch.from_numpy(X_new[:1]).requires_grad_(True)
    k = int(np.argmax(expected[0]))
    module.decision(x)[0, k].backward()
    step = 1e-6
    numeric = [
        (module.decision(torch.from_numpy(X_new[:1] + step * e))[0, k]
         - module.decision(torch.from_numpy(X_new[:1] - step * e))[0, k]).item() / (2 * step)
        for e in np.eye(6)[:, None, :]
    ]
    np.testing.assert_allclose(x.grad.numpy()[0], numeric, rtol=1e-4, atol=1e-6)
