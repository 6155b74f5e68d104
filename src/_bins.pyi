import numpy as np

def count_linear(
    x: np.ndarray, lo: float, scale: float, tol: float, interior: np.ndarray, counts: np.ndarray, /
) -> None: ...
