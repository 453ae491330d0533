"""Activations that tell a per-token w8a8 outlier split from one chosen over the batch."""
import torch


def plant_batch_outliers(x: torch.Tensor) -> torch.Tensor:
    """x [m, k] (k > 64), in place: each row gets an outlier (|x| > 6) in a column where the
    next row holds its largest inlier (5.5), and row 0 five more outliers. Were the outlier
    columns chosen over the batch, a row's result would change with the rows it is batched
    with. Returns x."""
    m, k = x.shape
    for r in range(m):
        c = (3 + 11 * r) % k
        x[r, c] = -9.0 if r % 2 else 40.0
        if m > 1:
            x[(r + 1) % m, c] = 5.5
    x[0, 60:65] = torch.tensor([8.0, -8.0, 6.5, 30.0, -7.0])
    return x
