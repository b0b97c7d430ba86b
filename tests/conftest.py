import os

# Progress bars stay off in tests; library code only shows them when asked (progress=True).
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
