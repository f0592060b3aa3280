"""Reference profile of training inputs and predictions, stored in a model package for drift.

The format, its writer and its validator are ``vivace.profile`` (one writer per format);
this module only turns the training frame into the columns it profiles. Categorical
values are labelled as pandas' ``astype(str)`` writes them, the same strings the model
package's ``features[].categories`` hold, which the drift sketch maps category codes to.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vivace import profile as profiles

FORMAT = profiles.FORMAT


def numeric_profile(values: np.ndarray, bins: int = profiles.DEFAULT_BINS) -> dict[str, Any]:
    """Entry of a numeric column (NaN and +-inf count as missing)."""
    return profiles.numeric_entry(np.asarray(values, dtype="float64"), bins)


def categorical_profile(values: Any) -> dict[str, Any]:
    import pandas as pd

    series = pd.Series(values)
    counts = series.dropna().astype(str).value_counts().sort_index()
    return profiles.categorical_entry([str(k) for k in counts.index], counts.to_numpy(),
                                      int(series.isna().sum()))


def build_profile(frame: Any, categorical: list[str], predictions: np.ndarray,
                  bins: int = profiles.DEFAULT_BINS) -> dict[str, Any]:
    """Profile every column of `frame` (pandas) and the model's predictions on it."""
    features = {
        str(col): categorical_profile(frame[col]) if col in categorical
        else numeric_profile(frame[col].to_numpy(dtype="float64", na_value=np.nan), bins)
        for col in frame.columns
    }
    return profiles.make_profile(features, len(frame), numeric_profile(np.asarray(predictions).reshape(-1), bins))
