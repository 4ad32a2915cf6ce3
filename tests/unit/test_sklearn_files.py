"""The packaged datasets read without importing scikit-learn equal scikit-learn's own loaders."""

from __future__ import annotations

import numpy as np
import pytest

from cadence.data import sklearn_files
from cadence.data.errors import DataError


def test_digits_are_scikit_learns() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    x, y = sklearn_files.digits()
    np.testing.assert_array_equal(x, ref.data)
    np.testing.assert_array_equal(y, ref.target)
    assert x.dtype == np.float64 and y.dtype == np.int64


def test_breast_cancer_is_scikit_learns() -> None:
    from sklearn.datasets import load_breast_cancer

    ref = load_breast_cancer()
    x, y = sklearn_files.breast_cancer()
    np.testing.assert_array_equal(x, ref.data)
    np.testing.assert_array_equal(y, ref.target)


def test_a_missing_file_names_the_package_to_install(monkeypatch) -> None:
    monkeypatch.setattr(sklearn_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="install scikit-learn"):
        sklearn_files.digits()
