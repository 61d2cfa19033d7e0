"""The noise and labels an evaluation samples from: fixed by (seed, n, shape, classes) alone, whatever the world size.

Noise: n rows of N(0, I) from one CPU torch.Generator seeded with `seed`, exactly the tensor
torch.randn(n, *shape, generator=g) would be, but drawn in chunks of CHUNK rows and kept only for rows [lo, hi): a
rank holds its share, not all n (50,000 SD-VAE latents are 819 MB in float32). Chunked draws equal the one-shot draw
because torch's CPU normal sampler fills 16 values at a time from a sequential uniform stream: any chunk of a multiple
of 16 values, and a last chunk of at least 16, continues the stream exactly (tests/meanflow/test_evaluate_latents.py
guards this against a torch change). Every rank draws all n rows (a few seconds at 50k latents), which leaves the
generator where the labels start.

Labels, class-balanced: with n = q C + r for C classes, every class gets q samples and r classes one more, spread
evenly over the class range (class floor(i C / r) for i < r, so a small n still covers all of ImageNet's classes rather
than its first r), in the order [0, 1, ..., C-1] * q + extras, then permuted by torch.randperm(n) on the same
generator. At 50,000 samples of 1000 classes: 50 each. For r = 0 this is the order evaluate used before, so MNIST
results at n = 1000 are unchanged.
"""

import torch

CHUNK = 256  # rows per draw: a multiple of 16, so every chunk but the last holds a multiple of 16 values


def balanced_classes(n: int, num_classes: int) -> torch.Tensor:
    """(n,) int64 before shuffling: arange(num_classes) repeated n // num_classes times, then the r = n % num_classes
    extra classes floor(i num_classes / r), i < r (distinct, evenly spaced)."""
    q, r = divmod(n, num_classes)
    extras = torch.arange(r, dtype=torch.int64) * num_classes // max(r, 1)  # (r,)
    return torch.cat([torch.arange(num_classes, dtype=torch.int64).repeat(q), extras])


def evaluation_draws(seed: int, n: int, shape: tuple, num_classes: int, rows=None):
    """(noise (hi - lo, *shape) float32, labels (hi - lo,) int64 or None for num_classes == 0) of rows [lo, hi) =
    `rows` (default all n) of the n draws fixed by `seed`; see the module docstring."""
    lo, hi = (0, n) if rows is None else rows
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows [{lo}, {hi}) are not within the {n} draws")
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    kept, i = [], 0
    while i < n:
        rest = n - (i + CHUNK)
        j = n if rest <= 0 or numel * rest < 16 else i + CHUNK  # a last chunk under 16 values joins this one
        x = torch.randn(j - i, *shape, generator=g)  # (j - i, *shape)
        a, b = max(lo, i), min(hi, j)
        if a < b:
            kept.append(x[a - i:b - i])
        i = j
    noise = torch.cat(kept) if kept else torch.zeros(0, *shape)
    labels = None
    if num_classes > 0:
        labels = balanced_classes(n, num_classes)[torch.randperm(n, generator=g)][lo:hi]  # (hi - lo,)
    return noise, labels
